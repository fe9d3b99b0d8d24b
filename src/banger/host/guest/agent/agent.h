/* What the parts of banger-agent share: the protocol's constants, the frame being built
 * (out[], outlen), the helpers that fill it and read a body's fields (wire.c), those that
 * send it (banger-agent.c), and the entry points of the other parts (listening.c,
 * files.c; exec.c has exec.h). */
#ifndef BANGER_AGENT_H
#define BANGER_AGENT_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define VERSION "0.2.0"
#define MAX_BODY 65536
#define HDR 9                    /* u32 length, u8 kind, u32 chan */

enum {
    HELLO = 0x01, PING = 0x02, EXEC = 0x03, STDIN = 0x04, STDIN_EOF = 0x05, SIGNAL = 0x06,
    RESIZE = 0x07, STATS_REQ = 0x08, SYNC = 0x09, POWEROFF = 0x0a, TIME_SET = 0x0b,
    HELLO_REQ = 0x0c, LISTENING_REQ = 0x0d, CREDIT = 0x0e, FILE_PUT = 0x0f,
    STARTED = 0x10, STDOUT = 0x11, STDERR = 0x12, EXIT = 0x13, EXEC_ERROR = 0x14,
    STATS = 0x20, PONG = 0x21, DONE = 0x22, ERROR = 0x23, LISTENING = 0x24,
    FILE_GET = 0x30, DATA = 0x31, DATA_EOF = 0x32,
};

/* The features this agent announces in HELLO (tag 5, one field each). */
#define FEATURES {"credit", "listening", "files"}

extern unsigned char out[HDR + MAX_BODY];
extern size_t outlen;
extern bool connected;

void warnx(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
long long now_ms(void);
uint32_t be32(const unsigned char *p);
void put32(unsigned char *p, uint32_t v);
void begin(void);
void put_field(int tag, const void *v, size_t n);
void put_i64(int tag, int64_t v);
void put_str(int tag, const char *s);
/* Make s valid UTF-8 in place (strings on the wire are): every byte of an invalid or cut
 * sequence becomes '?'. A kernel name, a mount point or a message cut to a buffer may
 * be any bytes. */
void utf8_clean(char *s);
void send_frame(int kind, uint32_t chan);
void send_error(int kind, uint32_t chan, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* A frame's fields, read in order with next_field(): 1 a field (tag, value, length), 0
 * the end, -1 truncated (the frame is malformed). */
struct fields { const unsigned char *p, *end; };
int next_field(struct fields *f, int *tag, const unsigned char **v, uint32_t *n);
/* Every field of a body is whole. */
bool well_formed(const unsigned char *b, size_t n);
bool as_i64(const unsigned char *v, uint32_t n, int64_t *x);
bool find_field(const unsigned char *b, size_t n, int want, const unsigned char **v,
                uint32_t *len);
bool int_field(const unsigned char *b, size_t n, int want, int64_t *x);
void nonblock(int fd);
void close_fd(int *fd);
void send_credit(uint32_t chan, int64_t bytes);
/* A CREDIT's BYTES; false (and ERROR sent) if missing or out of 1..2^40. */
bool credit_field(uint32_t chan, const unsigned char *b, size_t n, int64_t *x);

/* listening.c: answer a LISTENING_REQ. */
void do_listening(uint32_t chan);

/* files.c: FILE_PUT and its DATA, FILE_GET; the poll loop asks files_pending() whether a
 * FILE_GET has something to send and calls files_pump() to send it. */
void file_put(uint32_t chan, const unsigned char *b, size_t n);
void file_get(uint32_t chan, const unsigned char *b, size_t n);
/* DATA, DATA_EOF, CREDIT for a file chan: true if the chan was a file transfer's. */
bool file_frame(int kind, uint32_t chan, const unsigned char *b, size_t n);
bool files_pending(void);
void files_pump(void);
void files_detach(void);
#endif
