/* A hostile guest agent, for tests/e2e/test_hostile_agent_e2e.py only (never in an image).
 *
 * It takes the agent's virtio-serial port (`banger.agent`) and speaks just enough of the
 * protocol (docs/agent-protocol.md) to be reached, then breaks it on purpose. An exec of
 * `hostile-mode MODE [N]` is always answered properly (STARTED, EXIT 0): that is how the
 * test picks how every other request is answered from then on:
 *
 *   honest     EXEC_ERROR / ERROR "hostile agent: honest mode" (POWEROFF: DONE, power off)
 *   absurd     a frame header whose length is 0xfffffff0
 *   garbage    bytes that are no frame at all, terminal escapes among them
 *   badmsg     a well-formed EXEC_ERROR / ERROR whose message is terminal escapes
 *   nochan     STDOUT for a chan the host never opened
 *   badfields  STARTED whose only field claims to be 2 GiB long
 *   mute       a frame header whose length is absurd, then silence for N seconds: the
 *              host's next connection gets no HELLO
 *   stall      a header announcing 1000 bytes, 10 of them, then silence for ever
 *   hello-proto, hello-huge
 *              a HELLO that lies (PROTOCOL 2 with an escape-laden VERSION; a VERSION
 *              field that claims 2 GiB) for every HELLO it sends and as the answer to
 *              any request, for N seconds (default 1), then honest again
 *
 * Build: gcc -static -O1 -o hostile-agent hostile_agent.c
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/reboot.h>
#include <time.h>
#include <unistd.h>

enum { MAX_FRAME = 65541 };
enum {
    HELLO = 0x01, EXEC = 0x03, HELLO_REQ = 0x0c, POWEROFF = 0x0a,
    STARTED = 0x10, STDOUT = 0x11, EXIT = 0x13, EXEC_ERROR = 0x14, DONE = 0x22, ERROR = 0x23,
};

static int fd = -1;
static char mode[32] = "honest";
static time_t until;       /* when a hello-* or mute mode ends */
static int forever;         /* silent for good (after a stall) */
static char boot_id[64] = "00000000-0000-0000-0000-000000000000";
static unsigned char out[MAX_FRAME + 64];
static size_t olen;

static void put32(unsigned char *p, uint32_t v) {
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

static uint32_t get32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void raw(const void *b, size_t n) {
    const unsigned char *p = b;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w <= 0)
            return;
        p += w;
        n -= (size_t)w;
    }
}

static void begin(void) { olen = 9; }

static void field(int tag, uint32_t len, const void *v, size_t n) {
    out[olen] = (unsigned char)tag;
    put32(out + olen + 1, len);
    memcpy(out + olen + 5, v, n);
    olen += 5 + n;
}

static void field_i64(int tag, int64_t x) {
    unsigned char b[8];
    for (int i = 0; i < 8; i++)
        b[i] = (unsigned char)((uint64_t)x >> (56 - 8 * i));
    field(tag, 8, b, 8);
}

static void field_str(int tag, const char *s) { field(tag, strlen(s), s, strlen(s)); }

static void send_frame(int kind, uint32_t chan) {
    put32(out, (uint32_t)olen - 4);
    out[4] = (unsigned char)kind;
    put32(out + 5, chan);
    raw(out, olen);
}

/* In a hello-* mode while it lasts; honest again after. */
static int lying(void) {
    if (strncmp(mode, "hello-", 6))
        return 0;
    if (time(NULL) < until)
        return 1;
    strcpy(mode, "honest");
    return 0;
}

static void hello(int64_t token) {
    int lies = lying();
    begin();
    if (lies && !strcmp(mode, "hello-proto")) {
        field_i64(1, 2);
        field_str(2, "\x1b[2J\x1b]0;pwned\x07 9.9\r\nfake line");
    } else if (lies && !strcmp(mode, "hello-huge")) {
        field_i64(1, 1);
        field(2, 0x7ffffff0u, "0.2.0", 5);
    } else {
        field_i64(1, 1);
        field_str(2, "0.0-hostile");
        field_str(3, boot_id);
    }
    if (token >= 0)
        field_i64(4, token);
    field_str(5, "files");
    send_frame(HELLO, 0);
}

/* Answering nothing at all, not even HELLO_REQ (after a stall: for ever). */
static int silent(void) {
    if (strcmp(mode, "silent"))
        return 0;
    if (forever || time(NULL) < until)
        return 1;
    strcpy(mode, "honest");
    return 0;
}

/* A HELLO that lies, while the mode asks for it: true if it was sent. */
static int lie(int64_t token) {
    if (!lying())
        return 0;
    hello(token);
    return 1;
}

static void message(int kind, uint32_t chan, const char *msg) {
    begin();
    field_str(1, msg);
    send_frame(kind, chan);
}

static void misbehave(int kind, uint32_t chan) {
    unsigned char b[64];
    if (lie(-1))
        return;
    if (!strcmp(mode, "absurd")) {
        put32(b, 0xfffffff0u);
        b[4] = STDOUT;
        put32(b + 5, chan);
        memset(b + 9, 'x', 16);
        raw(b, 25);
    } else if (!strcmp(mode, "garbage")) {
        static const char g[] = "\x1b[31mGARBAGE\x1b[0m\x1b]0;pwned\x07\r\n\xff\xfe not a frame";
        raw(g, sizeof g - 1);
    } else if (!strcmp(mode, "badmsg")) {
        message(kind == EXEC ? EXEC_ERROR : ERROR, chan,
                "\x1b[2J\x1b[H\x1b]0;pwned\x07" "evil\r\nbanger: fake line\x1b[8m");
    } else if (!strcmp(mode, "nochan")) {
        begin();
        memcpy(out + olen, "boo\n", 4);
        olen += 4;
        send_frame(STDOUT, chan + 1000);
    } else if (!strcmp(mode, "badfields")) {
        begin();
        field(1, 0x7ffffff0u, "\0\0\0\0\0\0\0\1", 8);
        send_frame(STARTED, chan);
    } else if (!strcmp(mode, "stall")) {
        put32(b, 1000);
        b[4] = STDOUT;
        put32(b + 5, chan);
        memset(b + 9, 'y', 10);
        raw(b, 19);
        strcpy(mode, "silent");
        forever = 1;
    } else if (!strcmp(mode, "mute")) {
        put32(b, 0xfffffff0u);       /* the host drops the connection, and its next */
        raw(b, 4);                   /* one gets no HELLO while the silence lasts */
        strcpy(mode, "silent");
    } else if (silent()) {
        /* the stall goes on */
    } else if (kind == POWEROFF) {
        begin();
        send_frame(DONE, chan);
        sync();
        reboot(RB_POWER_OFF);
    } else {
        message(kind == EXEC ? EXEC_ERROR : ERROR, chan, "hostile agent: honest mode");
    }
}

/* The `hostile-mode MODE [N]` exec: true if this EXEC was one. */
static int control(uint32_t chan, const unsigned char *b, size_t n) {
    const unsigned char *args[3];
    uint32_t lens[3];
    int argc = 0;
    for (size_t i = 0; i + 5 <= n && argc < 3;) {
        uint32_t len = get32(b + i + 1);
        if (len > n - i - 5)
            return 0;
        if (b[i] == 1) {
            args[argc] = b + i + 5;
            lens[argc++] = len;
        }
        i += 5 + len;
    }
    if (argc < 2 || lens[0] != 12 || memcmp(args[0], "hostile-mode", 12) ||
        lens[1] >= sizeof mode || silent())
        return 0;
    memcpy(mode, args[1], lens[1]);
    mode[lens[1]] = 0;
    int secs = 0;
    for (uint32_t k = 0; argc > 2 && k < lens[2] && k < 3; k++)
        secs = secs * 10 + (args[2][k] - '0');
    until = time(NULL) + (secs > 0 ? secs : 1);
    begin();
    field_i64(1, 1);
    send_frame(STARTED, chan);
    begin();
    field_i64(1, 0);
    send_frame(EXIT, chan);
    return 1;
}

static void on_frame(int kind, uint32_t chan, const unsigned char *b, size_t n) {
    if (kind == HELLO_REQ) {
        int64_t token = -1;
        if (n >= 13 && b[0] == 1 && get32(b + 1) == 8) {
            token = 0;
            for (int i = 0; i < 8; i++)
                token = token << 8 | b[5 + i];
        }
        if (!lie(token) && !silent())
            hello(token);
        return;
    }
    static const unsigned char requests[] = {0x02, 0x03, 0x08, 0x09, 0x0a, 0x0b, 0x0d,
                                             0x0f, 0x30};
    if (!memchr(requests, kind, sizeof requests))
        return;                  /* STDIN, CREDIT, DATA, ...: dropped */
    if (kind == EXEC && control(chan, b, n))
        return;
    misbehave(kind, chan);
}

static int open_port(void) {
    char path[300] = "";
    DIR *d = opendir("/sys/class/virtio-ports");
    struct dirent *de;
    while (d && (de = readdir(d)) && !path[0]) {
        char np[600], name[64] = "";
        snprintf(np, sizeof np, "/sys/class/virtio-ports/%s/name", de->d_name);
        FILE *f = fopen(np, "re");
        if (!f)
            continue;
        if (fgets(name, sizeof name, f) && !strncmp(name, "banger.agent\n", 13))
            snprintf(path, sizeof path, "/dev/%s", de->d_name);
        fclose(f);
    }
    if (d)
        closedir(d);
    return path[0] ? open(path, O_RDWR | O_CLOEXEC | O_NOCTTY) : -1;
}

int main(void) {
    FILE *f = fopen("/proc/sys/kernel/random/boot_id", "re");
    if (f) {
        if (fgets(boot_id, sizeof boot_id, f))
            boot_id[strcspn(boot_id, "\n")] = 0;
        fclose(f);
    }
    static unsigned char in[2 * MAX_FRAME];
    size_t ilen = 0;
    for (;;) {
        if (fd < 0) {
            if ((fd = open_port()) < 0) {
                usleep(100000);
                continue;
            }
            /* A host is there: greet it like the agent does on each (re)open. */
            struct pollfd w = {fd, POLLOUT, 0};
            if (poll(&w, 1, 0) == 1 && !(w.revents & POLLHUP) && !silent())
                hello(-1);
        }
        struct pollfd pf = {fd, POLLIN, 0};
        if (poll(&pf, 1, 100) < 0)
            continue;
        if (pf.revents & (POLLHUP | POLLERR | POLLNVAL)) {
            close(fd);           /* no host (yet, or any more): reopen soon */
            fd = -1;
            ilen = 0;
            usleep(100000);
            continue;
        }
        if (!(pf.revents & POLLIN))
            continue;
        ssize_t r = read(fd, in + ilen, sizeof in - ilen);
        if (r <= 0) {
            close(fd);
            fd = -1;
            ilen = 0;
            continue;
        }
        ilen += (size_t)r;
        while (ilen >= 9) {
            uint32_t len = get32(in);
            if (len < 5 || len > MAX_FRAME) {
                ilen = 0;        /* lost our place: drop what we have */
                break;
            }
            if (ilen < 4 + len)
                break;
            on_frame(in[4], get32(in + 5), in + 9, len - 5);
            memmove(in, in + 4 + len, ilen - 4 - len);
            ilen -= 4 + len;
        }
    }
}
