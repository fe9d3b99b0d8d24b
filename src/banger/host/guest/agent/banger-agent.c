/* banger-agent: the guest side of the banger agent protocol v1 (docs/agent-protocol.md).
 *
 * One process, one poll() loop: the channel to the host (a virtio-serial port, or an
 * inherited stream fd in tests), a SIGCHLD self-pipe, and every running exec's pipes or pty.
 * No dependency beyond libc (built static): it must run in images with no shell, no Python
 * and no sshd. The host is the client; every length it sends is checked before use.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/reboot.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"

#define MAX_EXECS 128
#define STDIN_HOLD (1 << 20)     /* queued stdin above which the channel is not read */
#define STDIN_WINDOW (256 << 10) /* stdin credit per exec (credit mode) */
#define DRAIN_MS 250             /* output still read after an exec's process ended */
#define RETRY_MS 100             /* pause between attempts to (re)open the port */

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
static int chan_fd = -1, selfpipe[2];
bool connected;
static bool fd_mode, test_poweroff;
static const char *port_path;
static long long next_open;
static unsigned char inbuf[HDR + MAX_BODY];
unsigned char out[HDR + MAX_BODY];
size_t outlen;
static size_t inlen;
/* EXEC's strings, NUL-terminated: each field costs 5 + n bytes of body and n + 1 here. */
static char strbuf[MAX_BODY];
static char *argv_[MAX_BODY / 5 + 1], *envp_[MAX_BODY / 5 + 1];

void warnx(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("banger-agent: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000LL + ts.tv_nsec / 1000000;
}

uint32_t be32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

void put32(unsigned char *p, uint32_t v) {
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

/* ---- the channel ---------------------------------------------------------------- */


/* A HELLO starts a session (docs/agent-protocol.md): the execs of the session that just
 * ended belong to a host that is gone. They get SIGHUP, as from a terminal that hung up,
 * and are reaped in silence; their chans are free for the next host, which numbers its
 * own from 1 again. */
static void detach_execs(void) {
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
    files_detach();
}

static void lost_channel(void) {
    if (fd_mode) {
        files_detach();          /* no half file left behind */
        exit(0);                 /* tests: the host closed its end */
    }
    detach_execs();
    if (chan_fd >= 0)
        close(chan_fd);
    chan_fd = -1;
    connected = false;
    inlen = 0;
    next_open = now_ms() + RETRY_MS;
}

/* Frames are written whole: a half-written frame would corrupt the stream. A full
 * channel blocks the agent (backpressure); a hang-up ends the connection. */
static void write_all(const unsigned char *p, size_t n) {
    while (n > 0 && connected) {
        ssize_t w = write(chan_fd, p, n);
        if (w > 0) {
            p += w;
            n -= (size_t)w;
        } else if (w < 0 && (errno == EAGAIN || errno == EINTR)) {
            struct pollfd pf = {chan_fd, POLLOUT, 0};
            if (poll(&pf, 1, -1) > 0 && (pf.revents & (POLLHUP | POLLERR | POLLNVAL)))
                lost_channel();
        } else {
            lost_channel();
        }
    }
}

/* The frame being built lives in out[]; a body goes at out + HDR. */
void begin(void) { outlen = HDR; }

void put_field(int tag, const void *v, size_t n) {
    if (outlen + 5 + n > sizeof out)
        return;                  /* callers stay under MAX_BODY; never overflow */
    out[outlen] = (unsigned char)tag;
    put32(out + outlen + 1, (uint32_t)n);
    memcpy(out + outlen + 5, v, n);
    outlen += 5 + n;
}

void put_i64(int tag, int64_t v) {
    unsigned char b[8];
    for (int i = 7; i >= 0; i--, v = (int64_t)((uint64_t)v >> 8))
        b[i] = (unsigned char)v;
    put_field(tag, b, 8);
}

void put_str(int tag, const char *s) { put_field(tag, s, strlen(s)); }

/* The length of the valid UTF-8 sequence at s (1..4), or 0 (as Python's decoder:
 * no overlong forms, no surrogates, nothing over U+10FFFF). */
static int utf8_seq(const unsigned char *s) {
    unsigned c = s[0];
    if (c < 0x80)
        return 1;
    int n = c >= 0xc2 && c <= 0xdf ? 2 : c >= 0xe0 && c <= 0xef ? 3
            : c >= 0xf0 && c <= 0xf4 ? 4 : 0;
    if (!n)
        return 0;
    unsigned lo = c == 0xe0 ? 0xa0 : c == 0xf0 ? 0x90 : 0x80;
    unsigned hi = c == 0xed ? 0x9f : c == 0xf4 ? 0x8f : 0xbf;
    if (s[1] < lo || s[1] > hi)
        return 0;
    for (int i = 2; i < n; i++)
        if (s[i] < 0x80 || s[i] > 0xbf)
            return 0;
    return n;
}

void utf8_clean(char *s) {
    unsigned char *u = (unsigned char *)s;
    while (*u) {
        int n = utf8_seq(u);
        if (n)
            u += n;
        else
            *u++ = '?';
    }
}

bool credit_field(uint32_t chan, const unsigned char *b, size_t n, int64_t *x) {
    if (int_field(b, n, 1, x) && *x > 0 && *x <= (1LL << 40))
        return true;
    send_error(ERROR, chan, "CREDIT needs BYTES, an i64 in 1..2^40");
    return false;
}

void send_credit(uint32_t chan, int64_t bytes) {
    begin();
    put_i64(1, bytes);
    send_frame(CREDIT, chan);
}

void send_frame(int kind, uint32_t chan) {
    put32(out, (uint32_t)(outlen - 4));
    out[4] = (unsigned char)kind;
    put32(out + 5, chan);
    if (connected)               /* nobody listening: output is dropped */
        write_all(out, outlen);
}

void send_error(int kind, uint32_t chan, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    utf8_clean(msg);             /* cut at the buffer, maybe inside a character */
    begin();
    put_str(1, msg);
    send_frame(kind, chan);
}

/* token >= 0: the HELLO answers a HELLO_REQ carrying that TOKEN and echoes it. */
static void send_hello(int64_t token) {
    char id[64] = "";
    FILE *f = fopen("/proc/sys/kernel/random/boot_id", "re");
    if (f) {
        if (!fgets(id, sizeof id, f))
            id[0] = 0;
        fclose(f);
    }
    id[strcspn(id, "\n")] = 0;
    begin();
    put_i64(1, 1);
    put_str(2, VERSION);
    put_str(3, id);
    if (token >= 0)
        put_i64(4, token);
    static const char *features[] = FEATURES;
    for (size_t i = 0; i < sizeof features / sizeof features[0]; i++)
        put_str(5, features[i]);
    send_frame(HELLO, 0);
}

static int open_port(void) {
    char path[300] = "";
    if (port_path) {
        snprintf(path, sizeof path, "%s", port_path);
    } else {                     /* no udev in the guest: find the port by its name */
        DIR *d = opendir("/sys/class/virtio-ports");
        struct dirent *de;
        while (d && (de = readdir(d)) && !path[0]) {
            char np[300], name[64] = "";
            snprintf(np, sizeof np, "/sys/class/virtio-ports/%s/name", de->d_name);
            FILE *f = fopen(np, "re");
            if (!f)
                continue;
            if (fgets(name, sizeof name, f) && !strcmp(strtok(name, "\n"), "banger.agent"))
                snprintf(path, sizeof path, "/dev/%s", de->d_name);
            fclose(f);
        }
        if (d)
            closedir(d);
        if (!path[0])
            return -1;
    }
    return open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
}

/* virtio-serial: the port opens while no host is there, reports POLLHUP until one
 * connects, and a write to it would block until then. HELLO waits for a host. */
static void try_connect(void) {
    if (chan_fd < 0) {
        if (now_ms() < next_open)
            return;
        next_open = now_ms() + RETRY_MS;
        if ((chan_fd = open_port()) < 0)
            return;
    }
    struct pollfd pf = {chan_fd, POLLOUT, 0};
    if (poll(&pf, 1, 0) >= 0 && !(pf.revents & (POLLHUP | POLLERR | POLLNVAL))) {
        connected = true;
        send_hello(-1);
    }
}

/* ---- fields --------------------------------------------------------------------- */

struct fields { const unsigned char *p, *end; };

/* 1: a field (tag, value, length); 0: the end; -1: truncated (the frame is malformed). */
static int next_field(struct fields *f, int *tag, const unsigned char **v, uint32_t *n) {
    if (f->p == f->end)
        return 0;
    if (f->end - f->p < 5)
        return -1;
    *tag = f->p[0];
    *n = be32(f->p + 1);
    if (*n > (size_t)(f->end - f->p - 5))
        return -1;
    *v = f->p + 5;
    f->p += 5 + *n;
    return 1;
}

static bool well_formed(const unsigned char *b, size_t n) {
    struct fields f = {b, b + n};
    int tag, r;
    const unsigned char *v;
    uint32_t len;
    while ((r = next_field(&f, &tag, &v, &len)) == 1) {}
    return r == 0;
}

bool as_i64(const unsigned char *v, uint32_t n, int64_t *x) {
    if (n != 8)
        return false;
    uint64_t u = 0;
    for (int i = 0; i < 8; i++)
        u = u << 8 | v[i];
    *x = (int64_t)u;
    return true;
}

/* The first field with that tag; false if absent. */
bool find_field(const unsigned char *b, size_t n, int want, const unsigned char **v,
                       uint32_t *len) {
    struct fields f = {b, b + n};
    int tag;
    while (next_field(&f, &tag, v, len) == 1)
        if (tag == want)
            return true;
    return false;
}

/* The first integer field with that tag; false if absent or not 8 bytes. */
bool int_field(const unsigned char *b, size_t n, int want, int64_t *x) {
    const unsigned char *v;
    uint32_t len;
    return find_field(b, n, want, &v, &len) && as_i64(v, len, x);
}

/* ---- execs ---------------------------------------------------------------------- */

static struct exec *find_exec(uint32_t chan) {
    if (chan == 0)
        return NULL;             /* 0 is the connection's, and a detached exec's */
    for (int i = 0; i < MAX_EXECS; i++)
        if (execs[i].used && execs[i].chan == chan)
            return &execs[i];
    return NULL;
}

void close_fd(int *fd) {
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

void nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

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

static void do_exec(uint32_t chan, const unsigned char *b, size_t n) {
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

static void reap(void) {
    char b[64];
    int st;
    pid_t pid;
    while (read(selfpipe[0], b, sizeof b) > 0) {}
    while ((pid = waitpid(-1, &st, WNOHANG)) > 0)
        for (int i = 0; i < MAX_EXECS; i++)
            if (execs[i].used && !execs[i].reaped && execs[i].pid == pid) {
                execs[i].reaped = true;
                execs[i].status = st;
                execs[i].drain_by = now_ms() + DRAIN_MS;
            }
}

/* ---- requests ------------------------------------------------------------------- */

static void stat_line(const char *path, const char *fmt, int n, long long *a, long long *b,
                      long long *c, long long *d) {
    char line[256];
    FILE *f = fopen(path, "re");
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, fmt, a, b, c, d) == n)
            break;
    if (f)
        fclose(f);
}

/* /proc/mounts escapes space, tab, newline and backslash as \ooo. */
static void unescape(char *s) {
    char *w = s;
    for (; *s; s++)
        if (s[0] == '\\' && s[1] >= '0' && s[1] <= '3' && s[2] >= '0' && s[2] <= '7' &&
            s[3] >= '0' && s[3] <= '7') {
            *w++ = (char)((s[1] - '0') << 6 | (s[2] - '0') << 3 | (s[3] - '0'));
            s += 3;
        } else {
            *w++ = *s;
        }
    *w = 0;
}

static void do_stats(uint32_t chan) {
    long long up = -1, upc = 0, user = -1, nice = 0, sys = 0, idle = 0, x = 0;
    long long total = -1, avail = -1;
    double l1 = 0, l5 = 0, l15 = 0;
    char line[4096];
    begin();
    FILE *f = fopen("/proc/uptime", "re");
    if (f && fscanf(f, "%lld.%lld", &up, &upc) == 2)
        put_i64(1, up * 1000 + upc * 10);
    if (f)
        fclose(f);
    if ((f = fopen("/proc/loadavg", "re")) && fscanf(f, "%lf %lf %lf", &l1, &l5, &l15) == 3) {
        put_i64(2, (int64_t)(l1 * 100 + 0.5));
        put_i64(3, (int64_t)(l5 * 100 + 0.5));
        put_i64(4, (int64_t)(l15 * 100 + 0.5));
    }
    if (f)
        fclose(f);
    stat_line("/proc/meminfo", "MemTotal: %lld kB", 1, &total, &x, &x, &x);
    stat_line("/proc/meminfo", "MemAvailable: %lld kB", 1, &avail, &x, &x, &x);
    if (total >= 0)
        put_i64(5, total);
    if (avail >= 0)
        put_i64(6, avail);
    stat_line("/proc/stat", "cpu %lld %lld %lld %lld", 4, &user, &nice, &sys, &idle);
    if (user >= 0) {
        put_i64(7, user + nice);
        put_i64(8, sys);
        put_i64(9, idle);
    }
    put_i64(10, sysconf(_SC_NPROCESSORS_ONLN));
    static const char *real[] = {"ext2", "ext3", "ext4", "xfs", "btrfs", "vfat", "exfat",
                                 "f2fs", "virtiofs", NULL};
    f = fopen("/proc/mounts", "re");
    while (f && fgets(line, sizeof line, f)) {
        char *save, *dev = strtok_r(line, " ", &save), *mnt = strtok_r(NULL, " ", &save);
        char *type = strtok_r(NULL, " ", &save), fs[4200];
        struct statvfs sv;
        bool ok = false;
        for (int i = 0; type && real[i]; i++)
            ok |= !strcmp(type, real[i]);
        if (!ok || !dev || !mnt)
            continue;
        unescape(mnt);
        if (strpbrk(mnt, "\t\n") || statvfs(mnt, &sv) < 0)
            continue;            /* a tab would break the field's format */
        utf8_clean(mnt);         /* shown, not opened again: any bytes, made UTF-8 */
        int n = snprintf(fs, sizeof fs, "%s\t%llu\t%llu\t%llu", mnt,
                         (unsigned long long)sv.f_blocks * sv.f_frsize,
                         (unsigned long long)(sv.f_blocks - sv.f_bfree) * sv.f_frsize,
                         (unsigned long long)sv.f_bavail * sv.f_frsize);
        if (n < 0 || (size_t)n >= sizeof fs || outlen + 5 + (size_t)n > sizeof out)
            continue;
        put_field(20, fs, (size_t)n);
    }
    if (f)
        fclose(f);
    send_frame(STATS, chan);
}

static void handle(int kind, uint32_t chan, const unsigned char *b, size_t n) {
    bool data = kind == STDIN || kind == DATA;
    if ((kind == DATA || kind == DATA_EOF || kind == CREDIT) && file_frame(kind, chan, b, n))
        return;
    if (kind == DATA || kind == DATA_EOF)
        return;                  /* for a transfer that ended (its ERROR crossed them) */
    if (!data && !well_formed(b, n)) {
        send_error(ERROR, chan, "malformed fields in a frame of kind 0x%02x", kind);
        return;
    }
    struct exec *e = find_exec(chan);
    int64_t x, y;
    const unsigned char *tv;
    uint32_t tlen;
    bool needs_exec = kind == STDIN || kind == STDIN_EOF || kind == SIGNAL || kind == RESIZE ||
                      kind == CREDIT;
    if (needs_exec && (chan == 0 || !e)) {
        send_error(ERROR, chan, "no exec on chan %u", chan);
        return;
    }
    switch (kind) {
    case PING:
        begin();
        send_frame(PONG, chan);
        break;
    case EXEC:
        do_exec(chan, b, n);
        break;
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
    case STATS_REQ:
        do_stats(chan);
        break;
    case LISTENING_REQ:
        do_listening(chan);
        break;
    case FILE_PUT:
        file_put(chan, b, n);
        break;
    case FILE_GET:
        file_get(chan, b, n);
        break;
    case CREDIT:
        if (credit_field(chan, b, n, &x) && e->credit)
            e->out_credit += x;
        break;
    case HELLO_REQ:
        /* A host that connected again at once may have hidden its hang-up from us
         * (virtio-serial): it asks, and gets a new session exactly as on a reopen. */
        if (chan != 0) {
            send_error(ERROR, chan, "HELLO_REQ goes on chan 0");
        } else if (find_field(b, n, 1, &tv, &tlen) && (!as_i64(tv, tlen, &x) || x < 0)) {
            send_error(ERROR, chan, "HELLO_REQ's TOKEN must be a non-negative i64");
        } else {
            detach_execs();
            send_hello(find_field(b, n, 1, &tv, &tlen) ? x : -1);
        }
        break;
    case SYNC:
        sync();
        begin();
        send_frame(DONE, chan);
        break;
    case TIME_SET:
        if (!int_field(b, n, 1, &x) || x < 0) {
            send_error(ERROR, chan, "TIME_SET needs UNIX_NS, a non-negative i64");
        } else if (clock_settime(CLOCK_REALTIME,
                                 &(struct timespec){.tv_sec = x / 1000000000,
                                                    .tv_nsec = x % 1000000000}) < 0) {
            send_error(ERROR, chan, "clock_settime: %s", strerror(errno));
        } else {
            begin();
            send_frame(DONE, chan);
        }
        break;
    case POWEROFF:
        begin();
        send_frame(DONE, chan);
        if (test_poweroff)
            exit(0);
        sync();
        reboot(RB_POWER_OFF);
        send_error(ERROR, chan, "reboot: %s", strerror(errno));
        break;
    default:
        send_error(ERROR, chan, "unknown kind 0x%02x", kind);
    }
}

static void read_channel(void) {
    ssize_t n = read(chan_fd, inbuf + inlen, sizeof inbuf - inlen);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (n <= 0) {
        lost_channel();
        return;
    }
    inlen += (size_t)n;
    size_t off = 0;
    while (chan_fd >= 0 && inlen - off >= 4) {
        uint32_t len = be32(inbuf + off);
        if (len < 5 || len > 5 + MAX_BODY) {
            warnx("host sent a frame of %u bytes (cap %d): dropping the connection", len,
                  5 + MAX_BODY);
            if (fd_mode)
                exit(2);
            lost_channel();
            return;
        }
        if (inlen - off < 4 + (size_t)len)
            break;
        handle(inbuf[off + 4], be32(inbuf + off + 5), inbuf + off + HDR, len - 5);
        off += 4 + len;
    }
    if (chan_fd < 0)
        return;                  /* lost while answering: inlen was reset */
    memmove(inbuf, inbuf + off, inlen - off);
    inlen -= off;
}

/* ---- main ----------------------------------------------------------------------- */

static void on_sigchld(int s) {
    int saved = errno;
    (void)s;
    if (write(selfpipe[1], "x", 1) < 0) {}
    errno = saved;
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--port") && i + 1 < argc) {
            port_path = argv[++i];
        } else if (!strcmp(argv[i], "--fd") && i + 1 < argc) {
            char *end;
            long fd = strtol(argv[++i], &end, 10);
            if (*end || fd < 0 || fd > 65535 || fcntl((int)fd, F_GETFD) < 0)
                return warnx("--fd %s: not an open file descriptor", argv[i]), 2;
            chan_fd = (int)fd;
            fd_mode = true;
        } else if (!strcmp(argv[i], "--test-exit-on-poweroff")) {
            test_poweroff = true;
        } else {
            fprintf(stderr, "usage: banger-agent [--port PATH | --fd N] "
                            "[--test-exit-on-poweroff]\n");
            return 2;
        }
    }
    /* Started by an init that may have closed 0-2: keep them taken so that no pipe lands
     * there (dup2 onto itself would leave O_CLOEXEC set in the child). */
    int fd;
    while ((fd = open("/dev/null", O_RDWR)) >= 0 && fd <= 2) {}
    if (fd > 2)
        close(fd);
    if (pipe2(selfpipe, O_CLOEXEC | O_NONBLOCK) < 0)
        return warnx("pipe: %s", strerror(errno)), 1;
    struct sigaction sa = {.sa_handler = on_sigchld, .sa_flags = SA_RESTART | SA_NOCLDSTOP};
    sigaction(SIGCHLD, &sa, NULL);
    sigset_t none;               /* whoever started us may have blocked SIGCHLD */
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGPIPE, SIG_IGN);    /* a closed stdin pipe or channel is an errno, not death */
    if (fd_mode) {
        fcntl(chan_fd, F_SETFD, FD_CLOEXEC);
        nonblock(chan_fd);
        connected = true;
        send_hello(-1);
    }
    struct pollfd pf[2 + 3 * MAX_EXECS];
    int who[2 + 3 * MAX_EXECS];  /* exec index * 3 + role (0 out, 1 err, 2 in) */
    for (;;) {
        if (!connected)
            try_connect();
        int np = 0, timeout = connected ? -1 : RETRY_MS;
        bool hold = false;
        pf[np++] = (struct pollfd){selfpipe[0], POLLIN, 0};
        for (int i = 0; i < MAX_EXECS; i++) {
            struct exec *e = &execs[i];
            if (!e->used)
                continue;
            hold |= !e->credit && e->qlen > STDIN_HOLD;   /* a host without credit */
            int *fds[3] = {&e->out, &e->err, &e->in};
            bool can_out = !e->credit || e->detached || e->out_credit > 0;
            for (int r = 0; r < 3; r++)
                if (*fds[r] >= 0 && (r < 2 ? can_out : e->qlen > 0)) {
                    who[np] = i * 3 + r;
                    pf[np++] = (struct pollfd){*fds[r], r < 2 ? POLLIN : POLLOUT, 0};
                }
            if (e->reaped) {
                long long left = e->drain_by - now_ms();
                left = left < 0 ? 0 : left;
                if (timeout < 0 || left < timeout)
                    timeout = (int)left;
            }
        }
        if (connected && files_pending())
            timeout = 0;
        int chan_at = -1;
        if (connected && !hold) {
            chan_at = np;
            pf[np++] = (struct pollfd){chan_fd, POLLIN, 0};
        }
        if (poll(pf, (nfds_t)np, timeout) < 0 && errno != EINTR)
            return warnx("poll: %s", strerror(errno)), 1;
        if (pf[0].revents)
            reap();
        for (int k = 1; k < np; k++) {
            if (k == chan_at || !pf[k].revents)
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
        for (int i = 0; i < MAX_EXECS; i++)
            if (execs[i].used)
                maybe_finish(&execs[i]);
        if (connected)
            files_pump();
        /* Requests last: they may start execs and close fds the loop above polled. */
        if (chan_at >= 0 && pf[chan_at].revents)
            read_channel();
    }
}
