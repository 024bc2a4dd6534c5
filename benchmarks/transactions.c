/* The floor of the benchmarks: the same libpam calls as the Python
 * contenders, in C. Built by the benchmark with the system compiler.
 *
 *   transactions SERVICE USER PASSWORD COUNT [CONFDIR]
 *
 * Runs COUNT transactions (pam_start[_confdir], pam_authenticate,
 * pam_acct_mgmt, pam_end), each answering every prompt with PASSWORD and
 * info or error messages with NULL, then prints the elapsed nanoseconds.
 * Exits 1 if any transaction fails: a benchmark of failures measures nothing.
 */
#define _GNU_SOURCE
#include <security/pam_appl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char *password;

static int answer(int num_msg, const struct pam_message **msg, struct pam_response **resp,
                  void *appdata) {
    (void)appdata;
    if (num_msg <= 0 || num_msg > PAM_MAX_NUM_MSG)
        return PAM_CONV_ERR;
    struct pam_response *out = calloc((size_t)num_msg, sizeof *out);
    if (out == NULL)
        return PAM_BUF_ERR;
    for (int i = 0; i < num_msg; i++) {
        int style = msg[i]->msg_style;
        if (style == PAM_PROMPT_ECHO_OFF || style == PAM_PROMPT_ECHO_ON || style == PAM_RADIO_TYPE) {
            out[i].resp = strdup(password);
            if (out[i].resp == NULL) {
                for (int j = 0; j < i; j++)
                    free(out[j].resp);
                free(out);
                return PAM_BUF_ERR;
            }
        }
    }
    if (resp == NULL) { /* pam_matrix shows messages with resp == NULL */
        free(out);
        return PAM_SUCCESS;
    }
    *resp = out;
    return PAM_SUCCESS;
}

int main(int argc, char **argv) {
    if (argc != 5 && argc != 6) {
        fprintf(stderr, "usage: %s SERVICE USER PASSWORD COUNT [CONFDIR]\n", argv[0]);
        return 2;
    }
    const char *service = argv[1], *user = argv[2];
    const char *confdir = argc == 6 ? argv[5] : NULL;
    password = argv[3];
    long count = strtol(argv[4], NULL, 10);
    struct pam_conv conv = {answer, NULL};
    struct timespec start, stop;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (long n = 0; n < count; n++) {
        pam_handle_t *pamh = NULL;
        int code = confdir ? pam_start_confdir(service, user, &conv, confdir, &pamh)
                           : pam_start(service, user, &conv, &pamh);
        if (code == PAM_SUCCESS)
            code = pam_authenticate(pamh, 0);
        if (code == PAM_SUCCESS)
            code = pam_acct_mgmt(pamh, 0);
        int end = pam_end(pamh, code);
        if (code != PAM_SUCCESS || end != PAM_SUCCESS) {
            fprintf(stderr, "transaction %ld failed: %d (pam_end %d)\n", n, code, end);
            return 1;
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &stop);
    long long ns = (stop.tv_sec - start.tv_sec) * 1000000000LL + (stop.tv_nsec - start.tv_nsec);
    printf("%lld\n", ns);
    return 0;
}
