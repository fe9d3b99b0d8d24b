"""The spec options' defaults are the model's: a create sends every field, so a default
written again in the CLI would quietly override the model's."""

from __future__ import annotations

import click
import pytest

from banger.cli.common import parse_size_mib, size_text
from banger.cli.vm import vm
from banger.model.vm import VMSpec


@pytest.mark.parametrize("command", ["create", "run"])
def test_spec_option_defaults_are_the_models(command: str) -> None:
    cmd = vm.commands[command]
    defaults = {p.name: p.default for p in cmd.params if isinstance(p, click.Option)}
    spec = VMSpec()
    assert defaults["image"] == spec.image
    assert defaults["vcpu"] == spec.vcpus
    assert parse_size_mib(str(defaults["memory"]), "--memory") == spec.memory_mib
    assert parse_size_mib(str(defaults["disk"]), "--disk-size") == spec.work_disk_mib


@pytest.mark.parametrize("mib", [1, 128, 512, 1000, 1024, 4096, 1536, 64 * 1024])
def test_size_text_reads_back(mib: int) -> None:
    assert parse_size_mib(size_text(mib), "--memory") == mib


def test_size_text_says_what_the_help_said() -> None:
    assert (size_text(512), size_text(4096)) == ("512M", "4G")
