#!/bin/sh
# Init job of the viewing stack: create the blob bucket on the stack's S3 server once it
# answers.  Idempotent (an existing bucket is fine); exits non-zero after ~2 minutes of
# trying so that `docker compose ps -a` shows the failure instead of hiding it.
set -u
endpoint="${S3_ENDPOINT:-http://s3:8333}"
bucket="${S3_BUCKET:-flashinfer-blobs}"
i=0
while [ "$i" -lt 60 ]; do
  if aws --endpoint-url "$endpoint" s3api head-bucket --bucket "$bucket" >/dev/null 2>&1; then
    echo "bucket s3://$bucket ready at $endpoint"
    exit 0
  fi
  aws --endpoint-url "$endpoint" s3api create-bucket --bucket "$bucket" >/dev/null 2>&1 || true
  i=$((i + 1))
  sleep 2
done
echo "could not create s3://$bucket at $endpoint" >&2
exit 1
