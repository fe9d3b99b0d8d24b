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
#include <sys/reboot.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"
#include "exec.h"

#define RETRY_MS 100             /* pause between attempts to (re)open the port */

static int chan_fd = -1, selfpipe[2];
bool connected;
static bool fd_mode, test_poweroff;
static const char *port_path;
static long long next_open;
static unsigned char inbuf[HDR + MAX_BODY];
unsigned char out[HDR + MAX_BODY];
size_t outlen;
static size_t inlen;

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

/* ---- the channel ---------------------------------------------------------------- */

/* A HELLO starts a session (docs/agent-protocol.md): the execs of the session that just
 * ended belong to a host that is gone. They get SIGHUP, as from a terminal that hung up,
 * and are reaped in silence; their chans are free for the next host, which numbers its
 * own from 1 again. */
static void detach_execs(void) {
    execs_detach();
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

void close_fd(int *fd) {
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

void nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

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
    int64_t x;
    const unsigned char *tv;
    uint32_t tlen;
    switch (kind) {
    case PING:
        begin();
        send_frame(PONG, chan);
        break;
    case EXEC:
        do_exec(chan, b, n);
        break;
    case STDIN:
    case STDIN_EOF:
    case SIGNAL:
    case RESIZE:
    case CREDIT:
        exec_frame(kind, chan, b, n);
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
    struct pollfd pf[2 + EXEC_POLLFDS];
    int who[EXEC_POLLFDS];
    for (;;) {
        if (!connected)
            try_connect();
        int np = 1, nexec, timeout = connected ? -1 : RETRY_MS;
        pf[0] = (struct pollfd){selfpipe[0], POLLIN, 0};
        bool hold = execs_poll(pf + 1, who, &nexec, &timeout);
        np += nexec;
        if (connected && files_pending())
            timeout = 0;
        int chan_at = -1;
        if (connected && !hold) {
            chan_at = np;
            pf[np++] = (struct pollfd){chan_fd, POLLIN, 0};
        }
        if (poll(pf, (nfds_t)np, timeout) < 0 && errno != EINTR)
            return warnx("poll: %s", strerror(errno)), 1;
        if (pf[0].revents) {
            char b[64];
            while (read(selfpipe[0], b, sizeof b) > 0) {}
            execs_reap();
        }
        execs_ready(pf + 1, who, nexec);
        execs_finish();
        if (connected)
            files_pump();
        /* Requests last: they may start execs and close fds the loop above polled. */
        if (chan_at >= 0 && pf[chan_at].revents)
            read_channel();
    }
}
