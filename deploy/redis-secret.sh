#!/usr/bin/env bash
# The Secret bank-churn-redis of the in-cluster Redis, with new random passwords, as YAML on
# stdout (nothing is written to disk, nothing is sent anywhere):
#
#   deploy/redis-secret.sh | kubectl apply -f -                   # first install
#   deploy/redis-secret.sh | kubectl apply -f - && kubectl -n bank-churn rollout restart \
#     statefulset/bank-churn-redis deployment/bank-churn deployment/bank-churn-jobs   # rotation
#
# Keys of the Secret:
#   users.acl            Redis' ACL file (deploy/base/redis/users.acl with the passwords' SHA-256)
#   BANKCHURN_REDIS_URL  redis://bank-churn:<password>@bank-churn-redis:6379/0, read by the pods
#                        as /run/secrets/bank-churn/BANKCHURN_REDIS_URL
#   keda-username, keda-password   for KEDA's TriggerAuthentication (components/keda)
#
# Options: --namespace NS (default bank-churn), --service HOST:PORT (default bank-churn-redis:6379).
set -euo pipefail
namespace=bank-churn
service=bank-churn-redis:6379
while [ $# -gt 0 ]; do
  case "$1" in
    --namespace) namespace=$2; shift 2 ;;
    --service) service=$2; shift 2 ;;
    *) echo "usage: $0 [--namespace NS] [--service HOST:PORT]" >&2; exit 2 ;;
  esac
done
here=$(cd "$(dirname "$0")" && pwd)
KUBECTL=${KUBECTL:-kubectl}
# 256 random bits each, hex: no character a URL or an ACL file would need to escape.
app_password=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
keda_password=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
sha256() { printf '%s' "$1" | sha256sum | cut -c1-64; }
acl=$(grep -v '^#' "$here/base/redis/users.acl" \
      | sed -e "s/APP_PASSWORD_SHA256/$(sha256 "$app_password")/" -e "s/KEDA_PASSWORD_SHA256/$(sha256 "$keda_password")/")
"$KUBECTL" create secret generic bank-churn-redis --namespace "$namespace" --dry-run=client -o yaml \
  --from-literal=users.acl="$acl" \
  --from-literal=BANKCHURN_REDIS_URL="redis://bank-churn:$app_password@$service/0" \
  --from-literal=keda-username=keda \
  --from-literal=keda-password="$keda_password"
