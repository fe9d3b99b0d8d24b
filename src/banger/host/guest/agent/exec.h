/* What the poll loop and the request handler (banger-agent.c) use of exec.c: EXEC, the
 * frames of a running exec, and the exec fds in the poll set. */
#ifndef BANGER_EXEC_H
#define BANGER_EXEC_H
#include <poll.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MAX_EXECS 128
#define EXEC_POLLFDS (3 * MAX_EXECS)   /* an exec polls its out, err and in at most */

/* EXEC: start the command (STARTED) or say why not (EXEC_ERROR, or ERROR for a bad
 * request). */
void do_exec(uint32_t chan, const unsigned char *b, size_t n);
/* STDIN, STDIN_EOF, SIGNAL, RESIZE or CREDIT for an exec's chan (ERROR if no exec has
 * it). */
void exec_frame(int kind, uint32_t chan, const unsigned char *b, size_t n);
/* A HELLO starts a session: the execs of the one that ended are detached (SIGHUP, reaped
 * in silence, their chans free). */
void execs_detach(void);
/* After a SIGCHLD: mark the execs whose process ended. */
void execs_reap(void);
/* The execs' fds to poll into pf (up to EXEC_POLLFDS; who[k]: exec index * 3 + role),
 * their count in *np; *timeout lowered to the next drain deadline. True: hold the
 * channel (a host without credit queued too much stdin). */
bool execs_poll(struct pollfd *pf, int *who, int *np, int *timeout);
/* Act on what poll() said of the fds execs_poll() gave. */
void execs_ready(const struct pollfd *pf, const int *who, int np);
/* EXIT for each exec whose process ended and whose output is drained. */
void execs_finish(void);
#endif
