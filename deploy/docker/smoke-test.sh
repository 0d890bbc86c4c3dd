#!/usr/bin/env bash
# Build deploy/docker/Dockerfile with podman and smoke-test the image, as CI does (.ci/run):
#
#   bash deploy/docker/smoke-test.sh        # as root; needs podman (Debian: apt install podman)
#
# 1. The base image (the Dockerfile's python:3.11-slim): pulled, or, where Docker Hub is out of
#    reach (a machine that reaches only Debian's mirror and PyPI), a local stand-in: a Debian 12
#    minbase with python3, pip and venv made by debootstrap, kept between runs.
# 2. The image, built from scratch (--no-cache) in Docker format (OCI would drop HEALTHCHECK).
# 3. --demo: ready, mailpartner_up 1, healthy by its HEALTHCHECK, runs as 10027, SIGTERM exits 0.
# 4. The compose pair (simulator + exporter with deploy/docker/config.yaml) on a named state
#    volume: a registration and the totals survive `podman restart`, the API down meanwhile.
# The image is left tagged mailpartner-exporter:latest, for docker-compose.yml.
set -euo pipefail
cd "$(dirname "$0")/../.."

image=${IMAGE:-mailpartner-exporter:latest}
base=docker.io/library/python:3.11-slim   # the Dockerfile's PYTHON_IMAGE
run=mpe-smoke-$$                          # names of this run's containers, volume and network
work=$(mktemp -d)

# What Debian 12's podman 4.3 needs on a VM (runc, explicit ulimits), unless set otherwise.
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/deploy/docker/containers.conf}

step() { printf '%s smoke: %s\n' "$(date -u +%T)" "$*"; }
fail() {
  echo "FAIL: $*" >&2
  for c in $(podman ps -a --filter "name=$run" --format '{{.Names}}'); do
    echo "--- logs of $c" >&2
    podman logs --tail 30 "$c" >&2 || true
  done
  exit 1
}
cleanup() {
  podman rm -f -v -t 0 "$run-demo" "$run-simulator" "$run-exporter" >/dev/null 2>&1 || true
  podman volume rm -f "$run-state" >/dev/null 2>&1 || true
  podman network rm -f "$run-net" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
# podman logs an error for each container with a HEALTHCHECK when no systemd runs it (no timers
# here: `podman healthcheck run` below runs it by hand).
quiet() { "$@" 2> >(grep -v 'systemd connection' >&2); }

# GET a URL; its body on stdout; fails after $2 seconds (default 30) of refusals or errors,
# or at once when container $3 (if given) is no longer running.
fetch() {
  local deadline=$((SECONDS + ${2:-30}))
  until curl -fsS --max-time 5 "$1" 2>/dev/null; do
    ((SECONDS < deadline)) || return 1
    [ -z "${3:-}" ] || [ "$(podman inspect --format '{{.State.Running}}' "$3")" = true ] || return 1
    sleep 0.5
  done
}
# The host port podman published for a container's port 10027 (or $2).
host_port() { podman port "$1" "${2:-10027}/tcp" | sed 's/.*://'; }
# The sum of the samples of metric $2 in the exposition at URL $1 (0 when none).
metric_sum() {
  curl -fsS --max-time 5 "$1/metrics" |
    awk -v name="$2" '$1 == name || index($1, name "{") == 1 { s += $NF } END { printf "%d\n", s }'
}

# --- 1. the base image --------------------------------------------------------------------
if podman image exists "$base"; then
  step "base image $base: $(podman image inspect --format '{{index .Labels "stand-in"}}' "$base" | sed 's/^$/as pulled/')"
elif timeout 60 podman pull -q "$base" >/dev/null 2>&1; then
  step "base image $base: pulled"
else
  step "base image $base: out of reach; making a Debian 12 stand-in with debootstrap"
  command -v debootstrap >/dev/null || fail "debootstrap is needed for the stand-in (apt install debootstrap)"
  root="$work/rootfs"
  debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates \
    bookworm "$root" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 ||
    { tail -20 "$work/debootstrap.log" >&2; fail "debootstrap failed"; }
  # The host's extra CAs (a proxy's), so that pip inside the build reaches PyPI as the host does.
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/" 2>/dev/null || true
  chroot "$root" update-ca-certificates >/dev/null 2>&1 || fail "update-ca-certificates failed in the stand-in"
  # The official image's pip installs system-wide; Debian's refuses without this marker gone.
  rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
  tar -C "$root" -c . | podman import -q \
    --change 'LABEL stand-in="Debian 12 minbase stand-in (deploy/docker/smoke-test.sh)"' \
    --change 'CMD ["python3"]' - "$base" >/dev/null
  rm -rf "$root"
fi

# --- 2. the build -------------------------------------------------------------------------
step "building $image (--no-cache: podman 4.3 fails RUN --mount=from= on a cached stage)"
podman build --quiet --format docker --no-cache -f deploy/docker/Dockerfile -t "$image" . >/dev/null ||
  fail "podman build failed"
podman image inspect --format '{{.Config.Healthcheck.Test}}' "$image" | grep -q healthy ||
  fail "the image has no HEALTHCHECK (built in OCI format?)"

# --- 3. the demo --------------------------------------------------------------------------
step "--demo: ready, mailpartner_up 1, healthy, user 10027, SIGTERM exits 0"
quiet podman run -d --name "$run-demo" -p 127.0.0.1::10027 "$image" --demo >/dev/null ||
  fail "--demo: podman run failed"
url="http://127.0.0.1:$(host_port "$run-demo")"
fetch "$url/-/ready" 60 "$run-demo" >/dev/null || fail "--demo: /-/ready did not answer 200 within 60 s"
deadline=$((SECONDS + 30))  # ready is not up: the gauge turns 1 with the first answer
until [ "$(metric_sum "$url" mailpartner_up)" = 1 ]; do
  ((SECONDS < deadline)) || fail "--demo: no 'mailpartner_up 1' in /metrics within 30 s"
  sleep 0.5
done
quiet podman healthcheck run "$run-demo" || fail "--demo: the HEALTHCHECK says unhealthy"
user=$(podman exec "$run-demo" id -u)
[ "$user" = 10027 ] || fail "--demo: runs as uid $user, not 10027"
started=$SECONDS
quiet podman stop -t 10 "$run-demo" >/dev/null
code=$(podman inspect --format '{{.State.ExitCode}}' "$run-demo")
[ "$code" = 0 ] || fail "--demo: exit status $code after SIGTERM, not 0"
((SECONDS - started < 5)) || fail "--demo: SIGTERM took $((SECONDS - started)) s, not under 5"
logs=$(podman logs "$run-demo" 2>&1)
grep -q Traceback <<<"$logs" && fail "--demo: a traceback in its logs"

# --- 4. the state volume, with the compose pair -------------------------------------------
step "compose pair: a registration and the totals survive podman restart"
podman network create "$run-net" >/dev/null || fail "cannot create a podman network"
podman volume create "$run-state" >/dev/null || fail "cannot create a podman volume"
quiet podman run -d --name "$run-simulator" --network "$run-net" --network-alias simulator \
  -p 127.0.0.1::10028 --entrypoint mailpartner-simulator "$image" \
  --listen 0.0.0.0:10028 --demo-sends --api-key demo-key >/dev/null ||
  fail "the simulator: podman run failed"
sim="http://127.0.0.1:$(host_port "$run-simulator" 10028)"
fetch "$sim/sim/stats" 30 "$run-simulator" >/dev/null || fail "the simulator did not start"
# The image's HEALTHCHECK probes the exporter's port, where the simulator serves nothing.
quiet podman healthcheck run "$run-simulator" >/dev/null 2>&1 &&
  fail "the HEALTHCHECK passes where no exporter listens"
exporter=(podman run -d --name "$run-exporter" --network "$run-net" -p 127.0.0.1::10027
  -v "$PWD/deploy/docker/config.yaml:/etc/mailpartner-exporter/config.yaml:ro"
  -v "$PWD/deploy/docker/api_key.example:/run/secrets/mailpartner_api_key:ro"
  -v "$run-state:/var/lib/mailpartner-exporter" "$image"
  --config.file=/etc/mailpartner-exporter/config.yaml --web.enable-registration)
quiet "${exporter[@]}" >/dev/null || fail "exporter: podman run failed"
url="http://127.0.0.1:$(host_port "$run-exporter")"
fetch "$url/-/ready" 60 "$run-exporter" >/dev/null || fail "exporter: /-/ready did not answer 200 within 60 s"
# A send the config does not list, registered as a sending application would.
curl -fsS -X POST "$sim/sim/send" -d '{"recipients": 40, "campaign": "smoke", "messageId": "777001"}' >/dev/null ||
  fail "the simulator refused the send"
curl -fsS -o /dev/null -X POST "$url/api/v1/messages" -H 'Content-Type: application/json' \
  -d '{"id": "777001", "labels": {"campaign": "smoke"}}' || fail "the registration was refused"
deadline=$((SECONDS + 60))
until curl -fsS "$url/metrics" | grep -c 'mailpartner_recipients_total{campaign="smoke"' >/dev/null; do
  ((SECONDS < deadline)) || fail "the registered send was not polled within 60 s"
  sleep 0.5
done
# The API goes down: from now on only the state file can bring the totals back.
curl -fsS -X POST "$sim/sim/faults" -d '{"http_status": 503}' >/dev/null ||
  fail "the simulator refused the fault"
failures=$(metric_sum "$url" mailpartner_api_request_failures_total)
deadline=$((SECONDS + 60))
until [ "$(metric_sum "$url" mailpartner_api_request_failures_total)" != "$failures" ]; do
  ((SECONDS < deadline)) || fail "no poll failed within 60 s of the API going down"
  sleep 0.5
done
before=$(metric_sum "$url" mailpartner_recipients_total)
[ "$before" != 0 ] || fail "no recipients counted before the restart"
quiet podman restart -t 10 "$run-exporter" >/dev/null
fetch "$url/-/ready" 60 "$run-exporter" >/dev/null || fail "exporter: not ready again within 60 s of the restart"
after=$(metric_sum "$url" mailpartner_recipients_total)
[ "$after" = "$before" ] ||
  fail "mailpartner_recipients_total summed to $before before the restart and $after after"
fetch "$url/api/v1/messages" | grep -c '"777001"' >/dev/null || fail "the registration did not survive the restart"
logs=$(podman logs "$run-exporter" 2>&1) || fail "cannot read the exporter's logs"
grep -q 'kept in memory only' <<<"$logs" && fail "the state is not on the volume"
grep -q Traceback <<<"$logs" && fail "a traceback in the exporter's logs"
step "ok: $before recipients counted before and after the restart; registration 777001 kept"
