#!/bin/sh
# Redis entrypoint of the vmq stack: render the ACL file from the environment, then start Redis.
#
#   REDIS_VMQ_PASSWORD    password of the `vmq` user (services)                 required
#   REDIS_HOST_PASSWORD   password of the `host` user (host workers)            required
#   REDIS_GUEST_PASSWORD  password of the `guest` user (in-guest responders)    required
#   VMQ_NAMESPACE         key namespace (default vmq)
#   REDIS_ACL_TEMPLATE    template to render (default /etc/vmq/redis/users.acl.template)
#   REDIS_ACL_FILE        where to write it (default /data/users.acl); pass the same path to --aclfile
#
# Only SHA-256 hashes of the passwords reach the file (mode 0600). Then the image's own entrypoint runs
# the command when there is one (the official image drops root and owns /data there); otherwise the
# command runs as is (the same script starts the local test's redis-server).
set -eu
: "${REDIS_VMQ_PASSWORD:?set REDIS_VMQ_PASSWORD (see .env.example)}"
: "${REDIS_HOST_PASSWORD:?set REDIS_HOST_PASSWORD (see .env.example)}"
: "${REDIS_GUEST_PASSWORD:?set REDIS_GUEST_PASSWORD (see .env.example)}"
namespace=${VMQ_NAMESPACE:-vmq}
template=${REDIS_ACL_TEMPLATE:-/etc/vmq/redis/users.acl.template}
acl_file=${REDIS_ACL_FILE:-/data/users.acl}

case $namespace in
  *[!A-Za-z0-9_.-]* | "" | [!A-Za-z0-9]*) echo "entrypoint: VMQ_NAMESPACE=$namespace is not a valid name" >&2; exit 2 ;;
esac
if [ "$REDIS_VMQ_PASSWORD" = "$REDIS_GUEST_PASSWORD" ] || [ "$REDIS_VMQ_PASSWORD" = "$REDIS_HOST_PASSWORD" ] \
   || [ "$REDIS_HOST_PASSWORD" = "$REDIS_GUEST_PASSWORD" ]; then
  echo "entrypoint: REDIS_VMQ_PASSWORD, REDIS_HOST_PASSWORD and REDIS_GUEST_PASSWORD must all differ" >&2
  exit 2
fi

sha256() { printf '%s' "$1" | sha256sum | cut -d' ' -f1; }

umask 077
# Redis ACL files have no comments: the template's are dropped here.
sed -e '/^[[:space:]]*#/d' -e '/^[[:space:]]*$/d' \
    -e "s/@NS@/$namespace/g" \
    -e "s/@VMQ_PASSWORD_SHA256@/$(sha256 "$REDIS_VMQ_PASSWORD")/" \
    -e "s/@HOST_PASSWORD_SHA256@/$(sha256 "$REDIS_HOST_PASSWORD")/" \
    -e "s/@GUEST_PASSWORD_SHA256@/$(sha256 "$REDIS_GUEST_PASSWORD")/" \
    "$template" > "$acl_file.tmp"
mv "$acl_file.tmp" "$acl_file"

if command -v docker-entrypoint.sh >/dev/null 2>&1; then
  exec docker-entrypoint.sh "$@"
fi
exec "$@"
