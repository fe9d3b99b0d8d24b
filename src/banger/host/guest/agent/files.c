/* FILE_PUT and FILE_GET (tar streams): not yet. */
#include "agent.h"
void file_put(uint32_t chan, const unsigned char *b, size_t n) {
    (void)b; (void)n;
    send_error(ERROR, chan, "FILE_PUT is not supported yet");
}
void file_get(uint32_t chan, const unsigned char *b, size_t n) {
    (void)b; (void)n;
    send_error(ERROR, chan, "FILE_GET is not supported yet");
}
bool file_frame(int kind, uint32_t chan, const unsigned char *b, size_t n) {
    (void)kind; (void)chan; (void)b; (void)n;
    return false;
}
bool files_pending(void) { return false; }
void files_pump(void) {}
void files_detach(void) {}
