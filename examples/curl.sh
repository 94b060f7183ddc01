#!/usr/bin/env bash
# The same requests with curl. Usage: examples/curl.sh [IMAGE.png] (server on 127.0.0.1:8000)
set -euo pipefail
BASE=${BASE:-http://127.0.0.1:8000}
KEY=${KEY:-EMPTY}
MODEL=$(curl -s -H "Authorization: Bearer $KEY" "$BASE/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')

# Plain text chat
curl -s "$BASE/v1/chat/completions" -H "Content-Type: application/json" -H "Authorization: Bearer $KEY" \
  -d "{\"model\": \"$MODEL\", \"max_tokens\": 32, \"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}]}"
echo

# An image as a data URL
if [ $# -ge 1 ]; then
  IMG=$(base64 -w0 "$1")
  curl -s "$BASE/v1/chat/completions" -H "Content-Type: application/json" -H "Authorization: Bearer $KEY" -d @- <<JSON
{"model": "$MODEL", "max_tokens": 32, "messages": [{"role": "user", "content": [
  {"type": "image_url", "image_url": {"url": "data:image/png;base64,$IMG"}},
  {"type": "text", "text": "What is in this picture?"}]}]}
JSON
  echo
fi

# Streaming (server-sent events)
curl -sN "$BASE/v1/chat/completions" -H "Content-Type: application/json" -H "Authorization: Bearer $KEY" \
  -d "{\"model\": \"$MODEL\", \"max_tokens\": 16, \"stream\": true, \"messages\": [{\"role\": \"user\", \"content\": \"Count to five.\"}]}"
