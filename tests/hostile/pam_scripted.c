/* pam_scripted: a PAM module that sends exactly the conversation calls a
 * script file asks for, including the malformed ones a buggy or hostile
 * module could send, checks the answers byte for byte, and records what it
 * received. Built by the tests (tests/hostile_module.py) with the system
 * compiler against libpam's headers.
 *
 *   auth required /path/pam_scripted.so script=FILE [record=FILE]
 *
 * Every service function (auth, setcred, account, session, password) runs the
 * script. Script lines, '#' starts a comment:
 *
 *   msg STYLE TEXT     queue one message; STYLE is any integer, TEXT is
 *                      null (a NULL msg pointer), hex:HEX (bytes; hex: alone
 *                      is the empty string) or rep:COUNT:HH (COUNT bytes HH)
 *   call [num=N] [rc=CODE] [nullmsg] [nullresp]
 *                      send the queued messages in one conversation call.
 *                      num= passes N as num_msg whatever was queued (the
 *                      array is padded with TEXT_INFO messages up to N so a
 *                      callback that reads them reads valid memory); rc= is
 *                      the return code expected (default PAM_SUCCESS);
 *                      nullmsg passes msg == NULL, nullresp resp == NULL.
 *   expect I TEXT      answer I of the last call must be TEXT (null: no
 *                      answer, a NULL array or a NULL resp)
 *   return CODE        what the module returns when every check held
 *                      (default PAM_SUCCESS)
 *   crash              abort() the process at once (SIGABRT): a module
 *                      that takes its application down
 *
 * A check that fails makes the module return PAM_AUTH_ERR at once. So does a
 * conversation that fails yet leaves *resp set (it must stay NULL). The
 * record file gets, appended:
 *
 *   call NUM_MSG RC resp=null|set       after each call
 *   answer I null|hex:HEX RETCODE       each answer of a call that set *resp
 *   mismatch WHAT                       a failed check
 *   result CODE                         what the service function returned
 *   flags N                             the flags the service function got
 *   end STATUS                          from pam_end (a pam_set_data cleanup)
 */
#define _GNU_SOURCE
#include <security/pam_appl.h>
#include <security/pam_modules.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define END_DATA_KEY "pam_scripted_record"

struct text {
    int is_null;
    size_t len;
    char *bytes; /* NUL-terminated copy */
};

struct run {
    FILE *record;
    struct pam_message *queue;
    size_t queued, capacity;
    struct pam_response *last; /* the last call's answers, owned here */
    int last_count;
};

static void note(struct run *run, const char *fmt, ...) {
    if (run->record == NULL)
        return;
    va_list args;
    va_start(args, fmt);
    vfprintf(run->record, fmt, args);
    va_end(args);
    fputc('\n', run->record);
    fflush(run->record);
}

static void write_hex(FILE *out, const char *bytes, size_t len) {
    fputs("hex:", out);
    for (size_t i = 0; i < len; i++)
        fprintf(out, "%02x", (unsigned char)bytes[i]);
}

static int hex_value(char c) {
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* TEXT as the script spells it; 0 on success. */
static int parse_text(const char *spec, struct text *out) {
    memset(out, 0, sizeof *out);
    if (strcmp(spec, "null") == 0) {
        out->is_null = 1;
        return 0;
    }
    if (strncmp(spec, "hex:", 4) == 0) {
        const char *hex = spec + 4;
        size_t digits = strlen(hex);
        if (digits % 2)
            return -1;
        out->len = digits / 2;
        out->bytes = malloc(out->len + 1);
        if (out->bytes == NULL)
            return -1;
        for (size_t i = 0; i < out->len; i++) {
            int high = hex_value(hex[2 * i]), low = hex_value(hex[2 * i + 1]);
            if (high < 0 || low < 0) {
                free(out->bytes);
                return -1;
            }
            out->bytes[i] = (char)(high * 16 + low);
        }
        out->bytes[out->len] = '\0';
        return 0;
    }
    if (strncmp(spec, "rep:", 4) == 0) {
        char *colon;
        unsigned long count = strtoul(spec + 4, &colon, 10);
        if (*colon != ':' || hex_value(colon[1]) < 0 || hex_value(colon[2]) < 0)
            return -1;
        out->len = count;
        out->bytes = malloc(count + 1);
        if (out->bytes == NULL)
            return -1;
        memset(out->bytes, hex_value(colon[1]) * 16 + hex_value(colon[2]), count);
        out->bytes[count] = '\0';
        return 0;
    }
    return -1;
}

static void free_last(struct run *run) {
    if (run->last != NULL) {
        for (int i = 0; i < run->last_count; i++)
            free(run->last[i].resp);
        free(run->last);
    }
    run->last = NULL;
    run->last_count = 0;
}

static void clear_queue(struct run *run) {
    for (size_t i = 0; i < run->queued; i++)
        free((char *)run->queue[i].msg);
    run->queued = 0;
}

static int queue_message(struct run *run, int style, struct text *text) {
    if (run->queued == run->capacity) {
        size_t capacity = run->capacity ? 2 * run->capacity : 8;
        struct pam_message *bigger = realloc(run->queue, capacity * sizeof *bigger);
        if (bigger == NULL)
            return -1;
        run->queue = bigger;
        run->capacity = capacity;
    }
    run->queue[run->queued].msg_style = style;
    run->queue[run->queued].msg = text->is_null ? NULL : text->bytes;
    run->queued++;
    return 0;
}

/* One conversation call; returns 0, or -1 when a check failed. */
static int send_call(struct run *run, const struct pam_conv *conv, char *options) {
    long num = (long)run->queued, expected_rc = PAM_SUCCESS;
    int null_msg = 0, null_resp = 0;
    for (char *word = strtok(options, " \t"); word; word = strtok(NULL, " \t")) {
        if (strncmp(word, "num=", 4) == 0)
            num = strtol(word + 4, NULL, 10);
        else if (strncmp(word, "rc=", 3) == 0)
            expected_rc = strtol(word + 3, NULL, 10);
        else if (strcmp(word, "nullmsg") == 0)
            null_msg = 1;
        else if (strcmp(word, "nullresp") == 0)
            null_resp = 1;
    }
    size_t entries = num > (long)run->queued ? (size_t)num : run->queued;
    const struct pam_message **array = calloc(entries ? entries : 1, sizeof *array);
    static const struct pam_message filler = {PAM_TEXT_INFO, "filler"};
    if (array == NULL)
        return -1;
    for (size_t i = 0; i < entries; i++)
        array[i] = i < run->queued ? &run->queue[i] : &filler;

    free_last(run);
    struct pam_response *resp = NULL;
    int rc = conv->conv((int)num, null_msg ? NULL : array, null_resp ? NULL : &resp,
                        conv->appdata_ptr);
    free(array);
    clear_queue(run);
    note(run, "call %ld %d resp=%s", num, rc, resp ? "set" : "null");

    int answers = num > 0 ? (int)num : 0;
    if (resp != NULL && run->record != NULL) {
        for (int i = 0; i < answers; i++) {
            if (resp[i].resp == NULL) {
                fprintf(run->record, "answer %d null %d\n", i, resp[i].resp_retcode);
            } else {
                fprintf(run->record, "answer %d ", i);
                write_hex(run->record, resp[i].resp, strlen(resp[i].resp));
                fprintf(run->record, " %d\n", resp[i].resp_retcode);
            }
        }
        fflush(run->record);
    }
    run->last = resp;
    run->last_count = resp ? answers : 0;
    if (rc != PAM_SUCCESS && resp != NULL) {
        note(run, "mismatch resp set by a failed conversation");
        return -1;
    }
    if (rc != expected_rc) {
        note(run, "mismatch rc %d, expected %ld", rc, expected_rc);
        return -1;
    }
    return 0;
}

static int check_answer(struct run *run, char *args) {
    char *spec;
    long index = strtol(args, &spec, 10);
    while (*spec == ' ' || *spec == '\t')
        spec++;
    struct text want;
    if (parse_text(spec, &want) != 0) {
        note(run, "mismatch bad expect line");
        return -1;
    }
    const char *got = NULL;
    if (run->last != NULL && index >= 0 && index < run->last_count)
        got = run->last[index].resp;
    int ok;
    if (want.is_null)
        ok = got == NULL;
    else
        ok = got != NULL && strlen(got) == want.len && memcmp(got, want.bytes, want.len) == 0;
    free(want.bytes);
    if (!ok)
        note(run, "mismatch answer %ld", index);
    return ok ? 0 : -1;
}

static void record_end(pam_handle_t *pamh, void *data, int status) {
    (void)pamh;
    /* Replaced by the next service function of the same handle: not the end. */
    if (!(status & PAM_DATA_REPLACE)) {
        FILE *record = fopen((const char *)data, "a");
        if (record != NULL) {
            fprintf(record, "end %d\n", status & ~PAM_DATA_SILENT);
            fclose(record);
        }
    }
    free(data);
}

static int run_script(pam_handle_t *pamh, int flags, int argc, const char **argv) {
    const char *script_path = NULL, *record_path = NULL;
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "script=", 7) == 0)
            script_path = argv[i] + 7;
        else if (strncmp(argv[i], "record=", 7) == 0)
            record_path = argv[i] + 7;
    }
    if (script_path == NULL)
        return PAM_SERVICE_ERR;
    struct run run = {0};
    if (record_path != NULL) {
        run.record = fopen(record_path, "a");
        note(&run, "flags %d", flags);
        char *key_data = strdup(record_path);
        if (key_data != NULL &&
            pam_set_data(pamh, END_DATA_KEY, key_data, record_end) != PAM_SUCCESS)
            free(key_data);
    }
    const struct pam_conv *conv = NULL;
    int result = pam_get_item(pamh, PAM_CONV, (const void **)&conv);
    if (result != PAM_SUCCESS || conv == NULL || conv->conv == NULL) {
        result = PAM_CONV_ERR;
        goto done;
    }
    FILE *script = fopen(script_path, "r");
    if (script == NULL) {
        result = PAM_SERVICE_ERR;
        goto done;
    }
    result = PAM_SUCCESS;
    char *line = NULL;
    size_t size = 0;
    ssize_t length;
    while ((length = getline(&line, &size, script)) >= 0) {
        while (length > 0 && (line[length - 1] == '\n' || line[length - 1] == '\r'))
            line[--length] = '\0';
        char *rest = line + strcspn(line, " \t");
        if (*rest)
            *rest++ = '\0';
        int failed = 0;
        if (strcmp(line, "msg") == 0) {
            char *spec;
            int style = (int)strtol(rest, &spec, 10);
            while (*spec == ' ' || *spec == '\t')
                spec++;
            struct text text;
            failed = parse_text(spec, &text) != 0;
            if (!failed && queue_message(&run, style, &text) != 0) {
                free(text.bytes);
                failed = 1;
            }
            if (failed)
                note(&run, "mismatch bad msg line");
        } else if (strcmp(line, "call") == 0) {
            failed = send_call(&run, conv, rest) != 0;
        } else if (strcmp(line, "expect") == 0) {
            failed = check_answer(&run, rest) != 0;
        } else if (strcmp(line, "crash") == 0) {
            abort();
        } else if (strcmp(line, "return") == 0) {
            result = (int)strtol(rest, NULL, 10);
        } else if (line[0] != '\0' && line[0] != '#') {
            note(&run, "mismatch unknown command %s", line);
            failed = 1;
        }
        if (failed) {
            result = PAM_AUTH_ERR;
            break;
        }
    }
    free(line);
    fclose(script);
done:
    clear_queue(&run);
    free(run.queue);
    free_last(&run);
    note(&run, "result %d", result);
    if (run.record != NULL)
        fclose(run.record);
    return result;
}

#define SERVICE_FUNCTION(name)                                                          \
    PAM_EXTERN int name(pam_handle_t *pamh, int flags, int argc, const char **argv) { \
        return run_script(pamh, flags, argc, argv);                                     \
    }

SERVICE_FUNCTION(pam_sm_authenticate)
SERVICE_FUNCTION(pam_sm_setcred)
SERVICE_FUNCTION(pam_sm_acct_mgmt)
SERVICE_FUNCTION(pam_sm_open_session)
SERVICE_FUNCTION(pam_sm_close_session)
SERVICE_FUNCTION(pam_sm_chauthtok)
