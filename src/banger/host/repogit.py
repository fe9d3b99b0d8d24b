"""git on a repo banger does not trust: its own config may name programs, and none run.

The one way :mod:`banger.host.workspace` and :mod:`banger.host.repostage` run git, on the
user's repo (select, the clone of its history, reading its config) and on the staged copy
(reset, update-index, add, commit-tree ...). A repo's ``.git/config`` (and any file it
includes) is the repo author's, not the user's: a repo from a tarball, a shared directory
or a colleague can set keys that make git run commands, and bangerd may run as root.
:func:`for_repo` lists the config key names without running anything
(``git config --list --name-only``, which reads config files and nothing else, with
includes followed) and :class:`RepoGit` overrides, as command-scope config (read last,
so it wins), every key that can run a program:

fixed keys (always overridden)
  ``core.fsmonitor=false``       runs a hook program whenever the index is read.
  ``core.hooksPath=/dev/null``   every hook (post-checkout, post-index-change,
                                 reference-transaction, pre-auto-gc ...) is looked up
                                 under a path that holds nothing.
  ``core.sshCommand=false``      ssh transport program (also GIT_SSH_COMMAND).
  ``core.askPass=`` (empty)      prompts a program; empty means no helper at all.
  ``core.pager=cat``             pager (git only pages to a terminal: belt and braces).
  ``core.editor=:``, ``sequence.editor=:``   ``:`` is git's "no editor".
  ``core.alternateRefsCommand=`` (empty) run to list an alternate's refs.
  ``credential.helper=`` (empty) resets the list of helpers (each runs a program).
  ``diff.external=`` (empty)     an external diff program.
  ``commit.gpgSign=false``, ``tag.gpgSign=false``, ``log.showSignature=false``:
                                 signing and verifying run ``gpg.program``.
  ``gc.auto=0``, ``maintenance.auto=false``: no background gc/maintenance process
                                 spawned on a repo banger only reads.
keys found in the listing (for every name there)
  ``filter.<d>.clean|smudge|process=`` (empty) and ``filter.<d>.required=false``: a
                                 filter driver (named by .gitattributes) runs on
                                 checkout and add; empty means "no filter".
  ``diff.<d>.textconv|command=`` (empty): diff drivers named by .gitattributes.
  ``merge.<d>.driver=`` (empty): merge drivers named by .gitattributes.
  ``credential.<url>.helper=`` (empty): URL-specific credential helpers.
  ``remote.<r>.uploadpack|receivepack``: back to git's own programs; a lazy fetch
                                 (partial clone) would run them on the host.
  ``pager.<cmd>=false``          per-command pagers.
environment
  ``GIT_ALLOW_PROTOCOL=file``    overrides every ``protocol.*`` key: only the local
                                 clone of the repo is allowed, never ssh, ext:: (runs a
                                 command), http or a remote helper.
  ``GIT_TERMINAL_PROMPT=0``, ``GIT_ASKPASS=`` (empty, which beats core.askPass and
  SSH_ASKPASS), ``GIT_PROXY_COMMAND=`` (empty: beats core.gitProxy, which is first-match
  and cannot be overridden by config), ``GIT_SSH_COMMAND=false``, ``GIT_PAGER=cat``,
  ``GIT_EDITOR=:``, ``GIT_SEQUENCE_EDITOR=:``.
  Removed: ``GIT_EXTERNAL_DIFF``, ``GIT_SSH``, ``GIT_CONFIG_PARAMETERS`` (ours replace
  it), and the variables that point git at another repo, index or work tree
  (``GIT_DIR``, ``GIT_WORK_TREE``, ``GIT_INDEX_FILE`` ...), inherited from whatever
  started the daemon.

Still read: the system and global config (the host's own: ``safe.directory`` and the
user's identity live there); the programs they name are neutralised like the repo's,
since the listing covers every scope. ``uploadpack.packObjectsHook`` needs nothing: git
reads it from those two only. The repo's ``core.worktree`` is refused by the caller (it
would point the copy at other files of the host).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from banger.host.runner import DEFAULT_MAX_OUTPUT, Completed, run

FIXED: tuple[tuple[str, str], ...] = (
    ("core.fsmonitor", "false"),
    ("core.hooksPath", "/dev/null"),
    ("core.sshCommand", "false"),
    ("core.askPass", ""),
    ("core.pager", "cat"),
    ("core.editor", ":"),
    ("sequence.editor", ":"),
    ("core.alternateRefsCommand", ""),
    ("credential.helper", ""),
    ("diff.external", ""),
    ("commit.gpgSign", "false"),
    ("tag.gpgSign", "false"),
    ("log.showSignature", "false"),
    ("gc.auto", "0"),
    ("maintenance.auto", "false"),
)

# (section, key) of "<section>.<subsection>.<key>" names -> the value that runs nothing.
_PER_NAME: dict[tuple[str, str], str] = {
    ("filter", "clean"): "",
    ("filter", "smudge"): "",
    ("filter", "process"): "",
    ("diff", "textconv"): "",
    ("diff", "command"): "",
    ("merge", "driver"): "",
    ("credential", "helper"): "",
    ("remote", "uploadpack"): "git-upload-pack",
    ("remote", "receivepack"): "git-receive-pack",
}

ENV: dict[str, str | None] = {
    "GIT_ALLOW_PROTOCOL": "file",
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_ASKPASS": "",
    "SSH_ASKPASS": "",
    "GIT_PROXY_COMMAND": "",
    "GIT_SSH_COMMAND": "false",
    "GIT_PAGER": "cat",
    "GIT_EDITOR": ":",
    "GIT_SEQUENCE_EDITOR": ":",
    "GIT_EXTERNAL_DIFF": None,
    "GIT_SSH": None,
    "GIT_CONFIG_PARAMETERS": None,
    "GIT_DIR": None,
    "GIT_WORK_TREE": None,
    "GIT_COMMON_DIR": None,
    "GIT_INDEX_FILE": None,
    "GIT_OBJECT_DIRECTORY": None,
    "GIT_ALTERNATE_OBJECT_DIRECTORIES": None,
    "GIT_NAMESPACE": None,
}


def overrides(names: Sequence[str]) -> list[tuple[str, str]]:
    """The config that runs nothing, for a repo whose config holds the keys ``names``."""
    out = dict(FIXED)
    for name in names:
        section, _, rest = name.partition(".")
        subsection, _, key = rest.rpartition(".")
        section, key = section.lower(), key.lower()
        if section == "pager" and not subsection:
            out[f"pager.{key}"] = "false"
        elif section == "filter" and subsection:
            # Every program of the driver, whichever of them this config sets.
            for program in ("clean", "smudge", "process"):
                out[f"filter.{subsection}.{program}"] = ""
            out[f"filter.{subsection}.required"] = "false"
        elif subsection and (section, key) in _PER_NAME:
            out[f"{section}.{subsection}.{key}"] = _PER_NAME[section, key]
    return list(out.items())


def env_for(config: Sequence[tuple[str, str]],
            extra: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """The environment (on top of the daemon's) for git with ``config`` as command-scope
    config: GIT_CONFIG_COUNT/KEY/VALUE take any key, even one whose subsection holds an
    ``=`` that ``-c key=value`` would split at."""
    env = dict(ENV)
    env["GIT_CONFIG_COUNT"] = str(len(config))
    for i, (key, value) in enumerate(config):
        env[f"GIT_CONFIG_KEY_{i}"] = key
        env[f"GIT_CONFIG_VALUE_{i}"] = value
    if extra:
        env.update(extra)
    return env


@dataclass(frozen=True)
class RepoGit:
    """git at ``repo`` (or, for :meth:`run_here`, without a repo) with ``config``."""

    repo: Path
    config: tuple[tuple[str, str], ...]

    def run(self, *args: str, check: bool = True, timeout: float = 600,
            env: Mapping[str, str] | None = None,
            max_output: int = DEFAULT_MAX_OUTPUT) -> Completed:
        """``git -C <repo> args`` with nothing of the repo's config able to run."""
        return run(["git", "-C", str(self.repo), *args], check=check, timeout=timeout,
                   env=env_for(self.config, env), max_output=max_output)

    def at(self, repo: Path) -> RepoGit:
        """The same config at another path of the same repository."""
        return RepoGit(repo, self.config)

    def out(self, *args: str, check: bool = True) -> str:
        """Stripped stdout, or "" when ``check`` is False and git failed."""
        res = self.run(*args, check=check)
        return res.stdout.strip() if res.returncode == 0 else ""

    def run_here(self, *args: str, timeout: float = 600) -> Completed:
        """``git args`` outside any repo (``clone`` of :attr:`repo`), same config."""
        return run(["git", *args], timeout=timeout, env=env_for(self.config))


def config_names(repo: Path) -> list[str]:
    """Every config key name ``git -C repo`` sees (all scopes, includes followed), read
    without running anything; [] when git cannot read it (the caller's git calls will
    say why)."""
    res = run(["git", "-C", str(repo), "config", "--list", "--includes", "--name-only",
               "-z"], check=False, timeout=60, env=env_for(FIXED))
    if res.returncode != 0:
        return []
    return [n for n in res.stdout.split("\0") if n]


def for_repo(repo: Path, *others: Path) -> RepoGit:
    """A :class:`RepoGit` for ``repo`` with every program named in its config (and in the
    config of ``others``: the repo a copy's config came from) neutralised."""
    names = [n for r in (repo, *others) for n in config_names(r)]
    return RepoGit(repo, tuple(overrides(names)))
