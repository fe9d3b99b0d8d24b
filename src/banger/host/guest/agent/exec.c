/* The execs of banger-agent (docs/agent-protocol.md, "Exec"): EXEC starts a command on
 * pipes or a pty, its output goes out as STDOUT/STDERR within the host's credit (WINDOW),
 * its stdin comes in as STDIN within the agent's, and EXIT follows the last output. The
 * poll loop (banger-agent.c) asks execs_poll() for their fds, hands their events to
 * execs_ready() and reaps children with execs_reap(). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include "agent.h"
#include "exec.h"

#define STDIN_HOLD (1 << 20)     /* queued stdin above which the channel is not read */
#define STDIN_WINDOW (256 << 10) /* stdin credit per exec (credit mode) */
#define DRAIN_MS 250             /* output still read after an exec's process ended */

struct exec {
    bool used, pty, reaped, in_eof;
    bool detached;               /* its host went away: nothing more is sent for it */
    bool credit;                 /* flow control: the host sent WINDOW (section 5) */
    int64_t out_credit;          /* output bytes the host will still take */
    size_t in_done;              /* stdin written to the command, not yet credited back */
    uint32_t chan;
    pid_t pid;
    int status;
    int out, err, in;            /* pty: out is the master, in a dup of it, err is -1 */
    unsigned char *q;            /* stdin the command has not read yet */
    size_t qlen, qcap;
    long long drain_by;          /* ms: once reaped, when to stop waiting for EOF */
};

static struct exec execs[MAX_EXECS];
/* EXEC's strings, NUL-terminated: each field costs 5 + n bytes of body and n + 1 here. */
static char strbuf[MAX_BODY];
static char *argv_[MAX_BODY / 5 + 1], *envp_[MAX_BODY / 5 + 1];

void execs_detach(void) {
    for (int i = 0; i < MAX_EXECS; i++) {
        struct exec *e = &execs[i];
        if (!e->used || e->detached)
            continue;
        e->detached = true;
        e->chan = 0;
        if (!e->reaped)
            kill(e->pty ? -e->pid : e->pid, SIGHUP);
        close_fd(&e->in);
        free(e->q);
        e->q = NULL;
        e->qlen = e->qcap = 0;
    }
}

static struct exec *find_exec(uint32_t chan) {
    if (chan == 0)
        return NULL;             /* 0 is the connection's, and a detached exec's */
    for (int i = 0; i < MAX_EXECS; i++)
        if (execs[i].used && execs[i].chan == chan)
            return &execs[i];
    return NULL;
}

/* In the child, between fork and exec: report why it could not start, then die. */
static _Noreturn void child_fail(int fd, const char *what, const char *arg) {
    char msg[600];
    int n = snprintf(msg, sizeof msg, "%s %s: %s", what, arg, strerror(errno));
    if (write(fd, msg, (size_t)n) < 0) {}
    _exit(127);
}

static _Noreturn void child(int errfd, const char *slave, int in, int outw, int errw,
                            const char *cwd) {
    /* The agent ignores SIGPIPE and catches SIGCHLD: the command starts clean. */
    for (int s = 1; s < NSIG; s++)
        signal(s, SIG_DFL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    setsid();                    /* the guest console's ^C is not the command's */
    if (slave) {
        int s = open(slave, O_RDWR);
        if (s < 0)
            child_fail(errfd, "open", slave);
        ioctl(s, TIOCSCTTY, 0);
        in = outw = errw = s;
    }
    /* Every other fd of the agent is O_CLOEXEC; dup2 clears it on 0-2 only. */
    if (dup2(in, 0) < 0 || dup2(outw, 1) < 0 || dup2(errw, 2) < 0)
        child_fail(errfd, "dup2", "stdio");
    if (chdir(cwd) < 0)
        child_fail(errfd, "chdir", cwd);
    environ = envp_;             /* execvp looks PATH up in the command's own env */
    execvp(argv_[0], argv_);
    child_fail(errfd, "execvp", argv_[0]);
}

static void spawn(struct exec *e, uint32_t chan, const char *cwd, int64_t rows, int64_t cols,
                  int64_t window) {
    int ep[2], in[2] = {-1, -1}, o[2] = {-1, -1}, er[2] = {-1, -1}, master = -1, dup_in = -1;
    char slave[64] = "", msg[600];
    bool pty = rows >= 0 && cols >= 0;
    if (pipe2(ep, O_CLOEXEC) < 0) {
        send_error(EXEC_ERROR, chan, "pipe: %s", strerror(errno));
        return;
    }
    if (pty) {
        struct winsize ws = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
        master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (master < 0 || grantpt(master) || unlockpt(master) ||
            ptsname_r(master, slave, sizeof slave) || ioctl(master, TIOCSWINSZ, &ws) ||
            (dup_in = fcntl(master, F_DUPFD_CLOEXEC, 3)) < 0) {
            snprintf(msg, sizeof msg, "pty: %s", strerror(errno));
            goto fail;
        }
    } else if (pipe2(in, O_CLOEXEC) || pipe2(o, O_CLOEXEC) || pipe2(er, O_CLOEXEC)) {
        snprintf(msg, sizeof msg, "pipe: %s", strerror(errno));
        goto fail;
    }
    pid_t pid = fork();
    if (pid == 0)
        child(ep[1], pty ? slave : NULL, in[0], o[1], er[1], cwd);
    if (pid < 0) {
        snprintf(msg, sizeof msg, "fork: %s", strerror(errno));
        goto fail;
    }
    close_fd(&ep[1]);
    close_fd(&in[0]); close_fd(&o[1]); close_fd(&er[1]);
    /* EOF here means the exec happened (the CLOEXEC pipe closed); bytes mean it failed. */
    ssize_t n, got = 0;
    while ((n = read(ep[0], msg + got, sizeof msg - 1 - (size_t)got)) > 0 ||
           (n < 0 && errno == EINTR))
        got += n > 0 ? n : 0;
    msg[got] = 0;
    if (got > 0) {
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {}
        goto fail;
    }
    close_fd(&ep[0]);
    *e = (struct exec){.used = true, .pty = pty, .chan = chan, .pid = pid,
                       .out = pty ? master : o[0], .err = pty ? -1 : er[0],
                       .in = pty ? dup_in : in[1], .credit = window > 0,
                       .out_credit = window};
    nonblock(e->out);
    if (!pty)
        nonblock(e->err);
    nonblock(e->in);
    begin();
    put_i64(1, pid);
    if (e->credit)
        put_i64(2, STDIN_WINDOW);
    send_frame(STARTED, chan);
    return;
fail:;
    int *fds[] = {&ep[0], &ep[1], &in[0], &in[1], &o[0], &o[1], &er[0], &er[1], &master,
                  &dup_in};
    for (size_t i = 0; i < sizeof fds / sizeof fds[0]; i++)
        close_fd(fds[i]);
    send_error(EXEC_ERROR, chan, "%s", msg);
}

void do_exec(uint32_t chan, const unsigned char *b, size_t n) {
    struct exec *slot = NULL;
    for (int i = 0; i < MAX_EXECS && !slot; i++)
        if (!execs[i].used)
            slot = &execs[i];
    if (chan == 0) {
        send_error(ERROR, chan, "EXEC needs a chan other than 0");
        return;
    }
    if (find_exec(chan)) {
        send_error(ERROR, chan, "chan %u is already in use", chan);
        return;
    }
    if (!slot) {
        send_error(ERROR, chan, "too many execs at once (max %d)", MAX_EXECS);
        return;
    }
    struct fields f = {b, b + n};
    int tag, argc = 0, envc = 0;
    const unsigned char *v;
    uint32_t len;
    size_t used = 0;
    const char *cwd = "/";
    int64_t rows = -1, cols = -1, window = 0;
    while (next_field(&f, &tag, &v, &len) == 1) {
        if (tag >= 1 && tag <= 3) {
            if (memchr(v, 0, len)) {
                send_error(ERROR, chan, "field %d holds a NUL byte", tag);
                return;
            }
            char *s = memcpy(strbuf + used, v, len);
            s[len] = 0;
            used += len + 1;
            if (tag == 1)
                argv_[argc++] = s;
            else if (tag == 2)
                envp_[envc++] = s;
            else
                cwd = s;
        } else if (tag == 4 || tag == 5) {
            int64_t x;
            if (!as_i64(v, len, &x) || x < 0 || x > 0xffff) {
                send_error(ERROR, chan, "PTY_%s must be an i64 in 0..65535",
                           tag == 4 ? "ROWS" : "COLS");
                return;
            }
            *(tag == 4 ? &rows : &cols) = x;
        } else if (tag == 6) {
            if (!as_i64(v, len, &window) || window <= 0) {
                send_error(ERROR, chan, "WINDOW must be a positive i64");
                return;
            }
        }
    }
    if (argc == 0) {
        send_error(ERROR, chan, "EXEC without an ARG");
        return;
    }
    argv_[argc] = envp_[envc] = NULL;
    spawn(slot, chan, cwd, rows, cols, window);
}

static void flush_stdin(struct exec *e) {
    while (e->in >= 0 && e->qlen > 0) {
        ssize_t w = write(e->in, e->q, e->qlen);
        if (w > 0) {
            memmove(e->q, e->q + w, e->qlen - (size_t)w);
            e->qlen -= (size_t)w;
            e->in_done += (size_t)w;
        } else if (w < 0 && errno == EAGAIN) {
            return;
        } else if (!(w < 0 && errno == EINTR)) {
            e->qlen = 0;         /* EPIPE/EIO: the command reads no more */
            close_fd(&e->in);
        }
    }
    if (e->in_eof && !e->pty)
        close_fd(&e->in);
    /* Credit back what the command took: once a quarter window, or when it caught up. */
    if (e->credit && !e->detached && e->in_done > 0 &&
        (e->in_done >= STDIN_WINDOW / 4 || e->qlen == 0)) {
        send_credit(e->chan, (int64_t)e->in_done);
        e->in_done = 0;
    }
}

static void queue_stdin(struct exec *e, const void *p, size_t n) {
    if (n == 0)
        return;
    if (e->in < 0 || (e->in_eof && !e->pty)) {
        e->in_done += n;         /* nothing reads it: dropped, and credited back */
        flush_stdin(e);
        return;
    }
    if (e->credit && e->qlen + n > STDIN_WINDOW) {
        send_error(ERROR, e->chan, "STDIN past the window (%zu bytes queued)", e->qlen);
        return;
    }
    if (e->qlen + n > e->qcap) {
        size_t cap = (e->qlen + n) * 2;
        unsigned char *q = realloc(e->q, cap);
        if (!q) {
            warnx("out of memory: stdin of chan %u dropped", e->chan);
            return;
        }
        e->q = q;
        e->qcap = cap;
    }
    memcpy(e->q + e->qlen, p, n);
    e->qlen += n;
    flush_stdin(e);
}

/* One read of at most MAX_BODY, straight into the frame buffer. */
static bool pump(struct exec *e, int *fd, int kind) {
    size_t want = MAX_BODY;
    if (e->credit && !e->detached) {
        if (e->out_credit <= 0)
            return false;        /* the host's consumer is behind: the pipe fills */
        if ((int64_t)want > e->out_credit)
            want = (size_t)e->out_credit;
    }
    ssize_t n = read(*fd, out + HDR, want);
    if (n > 0) {
        outlen = HDR + (size_t)n;
        e->out_credit -= n;
        if (!e->detached)
            send_frame(kind, e->chan);
        return true;
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return false;
    close_fd(fd);                /* EOF, or EIO: every slave side of a pty is closed */
    return false;
}

/* EXIT goes after the last output: once the process is reaped and its outputs reached
 * EOF, or DRAIN_MS later if something it left behind still holds them open. */
static void maybe_finish(struct exec *e) {
    if (!e->reaped)
        return;
    if (e->out >= 0 || e->err >= 0) {
        if (e->credit && !e->detached && e->out_credit <= 0) {
            e->drain_by = now_ms() + DRAIN_MS;   /* waiting for the host is not idle time */
            return;
        }
        if (now_ms() < e->drain_by)
            return;
        for (int i = 0; i < 16 && e->out >= 0 && pump(e, &e->out, STDOUT); i++) {}
        for (int i = 0; i < 16 && e->err >= 0 && pump(e, &e->err, STDERR); i++) {}
        close_fd(&e->out);
        close_fd(&e->err);
    }
    begin();
    if (WIFSIGNALED(e->status))
        put_i64(2, WTERMSIG(e->status));
    else
        put_i64(1, WEXITSTATUS(e->status));
    if (!e->detached)
        send_frame(EXIT, e->chan);
    close_fd(&e->in);
    free(e->q);
    *e = (struct exec){.used = false};
}

void execs_reap(void) {
    int st;
    pid_t pid;
    while ((pid = waitpid(-1, &st, WNOHANG)) > 0)
        for (int i = 0; i < MAX_EXECS; i++)
            if (execs[i].used && !execs[i].reaped && execs[i].pid == pid) {
                execs[i].reaped = true;
                execs[i].status = st;
                execs[i].drain_by = now_ms() + DRAIN_MS;
            }
}

void exec_frame(int kind, uint32_t chan, const unsigned char *b, size_t n) {
    struct exec *e = find_exec(chan);
    int64_t x, y;
    if (!e) {
        send_error(ERROR, chan, "no exec on chan %u", chan);
        return;
    }
    switch (kind) {
    case STDIN:
        queue_stdin(e, b, n);
        break;
    case STDIN_EOF:
        if (e->pty) {            /* a terminal has no half-close: send its EOF char */
            struct termios t;
            unsigned char eof = tcgetattr(e->in, &t) == 0 ? t.c_cc[VEOF] : 4;
            queue_stdin(e, &eof, 1);
        } else {
            e->in_eof = true;
            flush_stdin(e);
        }
        break;
    case SIGNAL:
        if (!int_field(b, n, 1, &x) || x <= 0 || x >= NSIG)
            send_error(ERROR, chan, "SIGNAL needs SIGNO, an i64 in 1..%d", NSIG - 1);
        else if (!e->reaped)     /* a reaped pid may already be someone else's */
            kill(e->pty ? -e->pid : e->pid, (int)x);
        break;
    case RESIZE:
        if (!int_field(b, n, 1, &x) || !int_field(b, n, 2, &y) || x < 0 || x > 0xffff ||
            y < 0 || y > 0xffff)
            send_error(ERROR, chan, "RESIZE needs ROWS and COLS, i64 in 0..65535");
        else if (!e->pty)
            send_error(ERROR, chan, "chan %u has no pty to resize", chan);
        else if (ioctl(e->in, TIOCSWINSZ,
                       &(struct winsize){.ws_row = (unsigned short)x,
                                         .ws_col = (unsigned short)y}) < 0)
            send_error(ERROR, chan, "TIOCSWINSZ: %s", strerror(errno));
        break;
    case CREDIT:
        if (credit_field(chan, b, n, &x) && e->credit)
            e->out_credit += x;
        break;
    }
}

bool execs_poll(struct pollfd *pf, int *who, int *np, int *timeout) {
    bool hold = false;
    *np = 0;
    for (int i = 0; i < MAX_EXECS; i++) {
        struct exec *e = &execs[i];
        if (!e->used)
            continue;
        hold |= !e->credit && e->qlen > STDIN_HOLD;   /* a host without credit */
        int *fds[3] = {&e->out, &e->err, &e->in};
        bool can_out = !e->credit || e->detached || e->out_credit > 0;
        for (int r = 0; r < 3; r++)
            if (*fds[r] >= 0 && (r < 2 ? can_out : e->qlen > 0)) {
                who[*np] = i * 3 + r;
                pf[(*np)++] = (struct pollfd){*fds[r], r < 2 ? POLLIN : POLLOUT, 0};
            }
        if (e->reaped) {
            long long left = e->drain_by - now_ms();
            left = left < 0 ? 0 : left;
            if (*timeout < 0 || left < *timeout)
                *timeout = (int)left;
        }
    }
    return hold;
}

void execs_ready(const struct pollfd *pf, const int *who, int np) {
    for (int k = 0; k < np; k++) {
        if (!pf[k].revents)
            continue;
        struct exec *e = &execs[who[k] / 3];
        int r = who[k] % 3;
        if (r == 0 && e->out == pf[k].fd)
            pump(e, &e->out, STDOUT);
        else if (r == 1 && e->err == pf[k].fd)
            pump(e, &e->err, STDERR);
        else if (r == 2 && e->in == pf[k].fd)
            flush_stdin(e);
    }
}

void execs_finish(void) {
    for (int i = 0; i < MAX_EXECS; i++)
        if (execs[i].used)
            maybe_finish(&execs[i]);
}
