#!/bin/sh
# A CLI agent for the tests, standing in for `claude -p` and the like: it reads
# the prompt on standard input and answers with its last line. Markers in the
# prompt choose what else it does: EXIT3 fails with exit code 3, SLOW sleeps,
# IGNORE_TERM ignores SIGTERM while it sleeps, SILENT answers on stderr only. With AGENT_JSON=1 it prints JSON
# lines (`{"type":"result","result":...}` last), like stream-json output.
prompt=$(cat)
last=$(printf '%s\n' "$prompt" | tail -n 1)
case "$prompt" in
*EXIT3*) echo "the agent gave up" >&2; exit 3 ;;
*IGNORE_TERM*) trap '' TERM; echo "ignoring SIGTERM"; sleep 300; exit 0 ;;
*SLOW*) echo "thinking hard"; sleep 300; exit 0 ;;
*SILENT*) echo "answering on stderr only" >&2; exit 0 ;;
esac
echo "reading the prompt from stdin; \$TANJIREN_PROMPT has $(printf %s "$TANJIREN_PROMPT" | wc -c) bytes" >&2
if [ "$AGENT_JSON" = 1 ]; then
    escaped=$(printf '%s' "$last" | sed 's/\\/\\\\/g; s/"/\\"/g')
    printf '{"type":"system","subtype":"init"}\n'
    printf '{"type":"result","result":"CLI answer: %s","usage":{"input_tokens":21,"output_tokens":4}}\n' "$escaped"
else
    echo "CLI answer: $last"
fi
