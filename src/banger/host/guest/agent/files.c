/* FILE_PUT and FILE_GET: files as tar streams (docs/agent-protocol.md, "Files"). This
 * file: the transfers' table (a chan each), what both kinds share and the routing of
 * their frames; put.c extracts a put's tar (hostile input), get.c streams a get's. */
#include <stdio.h>
#include <string.h>

#include "agent.h"
#include "files.h"
#include "tar.h"

#define MAX_XFERS 16

static struct xfer xfers[MAX_XFERS];

static struct xfer *find(uint32_t chan) {
    for (int i = 0; i < MAX_XFERS; i++)
        if (xfers[i].used && xfers[i].chan == chan)
            return &xfers[i];
    return NULL;
}

struct xfer *xfer_slot(uint32_t chan) {
    if (chan == 0 || find(chan)) {
        send_error(ERROR, chan, "chan %u is 0 or already in use", chan);
        return NULL;
    }
    for (int i = 0; i < MAX_XFERS; i++)
        if (!xfers[i].used) {
            xfers[i] = (struct xfer){.used = true, .chan = chan};
            return &xfers[i];
        }
    send_error(ERROR, chan, "too many file transfers at once (max %d)", MAX_XFERS);
    return NULL;
}

void xfer_release(struct xfer *x) {
    if (x->p)
        put_end(x->p);
    if (x->g)
        get_end(x->g);
    *x = (struct xfer){.used = false};
}

void files_detach(void) {
    for (int i = 0; i < MAX_XFERS; i++)
        if (xfers[i].used)
            xfer_release(&xfers[i]);
}

/* A string field of a request: false (and ERROR sent) if missing or not a path. */
bool path_field(uint32_t chan, const unsigned char *b, size_t n, const char *what,
                       char *out) {
    const unsigned char *v;
    uint32_t len;
    if (!find_field(b, n, 1, &v, &len) || len == 0 || len > PATH_CAP || memchr(v, 0, len)) {
        send_error(ERROR, chan, "%s needs a path (1..%d bytes, no NUL)", what, PATH_CAP);
        return false;
    }
    memcpy(out, v, len);
    out[len] = 0;
    return true;
}

/* A name for an ERROR message: strings on the wire are UTF-8, a name in a tar or on a
 * disk is any bytes; every byte outside printable ASCII becomes \xNN. Clipped at 200. */
const char *shown(const char *name) {
    static char buf[4 * 200 + 4];
    size_t n = 0;
    for (const unsigned char *c = (const unsigned char *)name; *c && n < 4 * 200; c++)
        n += (size_t)snprintf(buf + n, sizeof buf - n,
                              *c >= 0x20 && *c < 0x7f ? "%c" : "\\x%02x", *c);
    buf[n] = 0;
    return buf;
}

bool files_pending(void) {
    for (int i = 0; i < MAX_XFERS; i++)
        if (xfers[i].used && xfers[i].get && get_wants(xfers[i].g))
            return true;
    return false;
}

void files_pump(void) {
    for (int i = 0; i < MAX_XFERS && connected; i++)
        if (xfers[i].used && xfers[i].get && get_wants(xfers[i].g))
            get_pump(&xfers[i]);
}

bool file_frame(int kind, uint32_t chan, const unsigned char *b, size_t n) {
    struct xfer *x = find(chan);
    if (!x)
        return false;
    int64_t c;
    if (!x->get) {
        put_frame(x, kind, b, n);
    } else if (kind == CREDIT) {
        if (credit_field(chan, b, n, &c))
            get_credit(x->g, c);
    } else if (kind == DATA_EOF) {
        send_error(ERROR, chan, "FILE_GET cancelled by the host");
        xfer_release(x);
    }
    return true;
}
