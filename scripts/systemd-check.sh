#!/usr/bin/env bash
# shellcheck disable=SC2317  # the predicates below are called through check, wait_for and holds
# Manual check: transcribed's systemd units under a real systemd (252, Debian bookworm, as PID 1
# in a systemd-nspawn container), installed the way README.md's "Running under systemd" says: a
# venv in /opt/transcribed and `install-service --system` as root, a user's own venv and
# `install-service --user`. Then, with the offline engine and a WAV file as the source, it checks:
#   - the installed units and configs: ExecStart, no ExecStartPre=, the system config 0644 (its
#     dynamic user reads it), the user's config 0600;
#   - the system unit: Type=notify readiness, STATUS=, turns in its StateDirectory (0700, 0600),
#     the live view inside the container, reload applied / rejected, the watchdog (a healthy
#     daemon is not killed, a frozen one is), a clean stop, the end of the file (exit 0, no
#     restart, STATUS "session ended"), a bad config (exit 78, one line, no restart), a missing
#     credential file (exit 243, no restart), no onnxruntime/cpuinfo warnings, `systemd-analyze
#     security` exposure <= 2.0, the syscalls SystemCallFilter denies, MemoryDenyWriteExecute;
#   - a user unit with lingering: runs, reloads, stops, exit 78 without a restart.
#
# Manual, not part of CI: it needs root, a Debian/Ubuntu host (apt-get installs systemd-container,
# debootstrap and sox), and network to deb.debian.org and PyPI for the setup only (the container
# is booted with --private-network: nothing binds a port on the host). It works without systemd
# as the host's PID 1 (--register=no --keep-unit). About 5 min, +2 min the first time (the rootfs
# is debootstrapped once and reused; the project is reinstalled from SRC on every run).
#
#   sudo scripts/systemd-check.sh
#
# Environment: SRC (the checkout to install; default: the one this script is in), WORK (default
# /var/tmp/transcribed-systemd-check: logs, generated files), ROOT (the rootfs, default
# $WORK/root), MACHINE (the container's hostname, default sdtest), KEEP=1 (leave the container
# booted at the end; enter it with nsenter, as printed).
# Prints PASS/FAIL/INFO per check; exits 0 when every check passed, 1 when one failed, 2 when the
# setup failed (see $WORK/*.log).
set -uo pipefail

SRC=${SRC:-$(cd "$(dirname "$0")/.." && pwd)}
WORK=${WORK:-/var/tmp/transcribed-systemd-check}
ROOT=${ROOT:-$WORK/root}
MACHINE=${MACHINE:-sdtest}
KEEP=${KEEP:-0}
PIDFILE=$WORK/nspawn.pid
U=transcribed                 # the unit's name inside the container
RESTART_WINDOW=8              # the units' RestartSec=5 + 3 s margin (see holds)
NPASS=0 NFAIL=0

pass() { echo "PASS  $*"; NPASS=$((NPASS + 1)); }
fail() { echo "FAIL  $*"; NFAIL=$((NFAIL + 1)); }
info() { echo "INFO  $*"; }
check() { local name=$1; shift; if "$@"; then pass "$name"; else fail "$name"; fi; }
die() { echo "ABORT $*" >&2; exit 2; }

[[ $EUID == 0 ]] || die "run as root (sudo $0)"
[[ -f $SRC/pyproject.toml && -d $SRC/daemon ]] || die "SRC=$SRC is not a transcribed checkout"
mkdir -p "$WORK" || die "mkdir $WORK"

# --- helpers ---------------------------------------------------------------------------------
wait_for() {  # wait_for SECONDS CMD...: poll until CMD succeeds; 1 if it never did
  local t=$1; shift
  for _ in $(seq $((t * 2))); do "$@" && return 0; sleep 0.5; done
  return 1
}
# holds SECONDS CMD...: CMD stays true for the whole window (1 as soon as it is false). Only for
# checks of an absence ("not restarted"), after waiting for something positive (the start has
# ended): a restart would come RestartSec=5 s later, so the window is RESTART_WINDOW = 5 + 3 s.
holds() {
  local t=$1; shift
  for _ in $(seq $((t * 2))); do "$@" || return 1; sleep 0.5; done
  "$@"
}
nspawn_pid() {  # our booted nspawn, if any
  local p; p=$(cat "$PIDFILE" 2>/dev/null) || return 1
  [[ -n $p ]] && tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | grep -q -- "systemd-nspawn.*-D $ROOT " \
    && echo "$p"
}
pid1() { local n; n=$(nspawn_pid) && ps -o pid= --ppid "$n" | head -1 | tr -d ' '; }
in_c() {  # run a command inside the booted container, clean environment
  local p; p=$(pid1) || return 125
  [[ -n $p ]] || return 125
  nsenter -t "$p" -a -- /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 SYSTEMD_PAGER= SYSTEMD_COLORS=0 "$@"
}
as_alice() { in_c runuser -u alice -- env HOME=/home/alice "XDG_RUNTIME_DIR=/run/user/$alice_uid" bash -c "$1"; }
chroot_run() {  # run a script in the rootfs, not booted, with the host's network (setup only)
  systemd-nspawn -q -D "$ROOT" --register=no --keep-unit /bin/bash -c "$1" 2>&1 \
    | { grep -v 'Attempted to remove disk file system under "/run/systemd/nspawn/propagate/' || true; }
  return "${PIPESTATUS[0]}"
}
gone() { ! kill -0 "$1" 2>/dev/null; }
stop_container() {
  local n; n=$(nspawn_pid) || return 0
  in_c systemctl poweroff >/dev/null 2>&1
  wait_for 30 gone "$n" || kill "$n"
  wait_for 10 gone "$n"
  rm -f "$PIDFILE"
}
finish() {
  if [[ $KEEP == 1 && -n $(nspawn_pid) ]]; then
    info "container left running (nspawn pid $(nspawn_pid)); enter it: sudo nsenter -t $(pid1) -a"
  else
    stop_container
  fi
}
trap finish EXIT

sp() { in_c systemctl show -P "$1" "$U"; }                      # a property of the system unit
us() { as_alice "systemctl --user show -P $1 $U"; }             # ... of alice's user unit
inv_journal() { in_c journalctl --no-pager -o cat _SYSTEMD_INVOCATION_ID="$(sp InvocationID)"; }
jcursor() { in_c journalctl -q --no-pager -n 1 -o cat --show-cursor | sed -n 's/^-- cursor: //p'; }
jafter() { local c=$1; shift; in_c journalctl -q --no-pager -o cat --after-cursor="$c" "$@"; }
inv_count() { inv_journal | grep -c -- "$1"; }                  # lines of this invocation with $1
is_state() { [[ $(sp ActiveState) == "$1" ]]; }
n_turns() { in_c sh -c 'wc -l < /var/lib/transcribed/turns.jsonl 2>/dev/null || echo 0'; }
alice_turns() { as_alice 'wc -l < ~/transcripts/turns.jsonl 2>/dev/null || echo 0'; }
le() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a <= b) }'; } # a float comparison
ms() { date +%s%3N; }
# ended GET INV0: the start after invocation INV0 has ended: failed, inactive, or waiting to be
# restarted (GET = sp | us)
ended() {
  [[ $($1 InvocationID) != "$2" ]] || return 1
  local a s; a=$($1 ActiveState) s=$($1 SubState)
  [[ $a == failed || $a == inactive || $s == auto-restart ]]
}
both() { local cmd_; for cmd_ in "$@"; do $cmd_ || return 1; done; }  # both "CMD ARGS" ...: all succeed
one_of() { local v=$1 x; shift; for x in "$@"; do [[ $v == "$x" ]] && return 0; done; return 1; }
stays() { [[ $($1 ActiveState) == "$2" && $($1 NRestarts) == 0 ]]; }  # stays GET STATE

# --- setup (with network) -----------------------------------------------------------------------
echo "== setup (logs in $WORK)"
stop_container
need=(); for p in systemd-container debootstrap sox; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if ((${#need[@]})); then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" > "$WORK/apt.log" 2>&1 \
    || die "apt-get install ${need[*]}: see $WORK/apt.log"
fi
if [[ ! -x $ROOT/usr/bin/python3 || ! -x $ROOT/usr/bin/strace ]]; then
  debootstrap --include=systemd,systemd-sysv,dbus,libpam-systemd,python3,python3-venv,python3-dev,gcc,libc6-dev,portaudio19-dev,libportaudio2,ca-certificates,procps,strace \
    bookworm "$ROOT" http://deb.debian.org/debian > "$WORK/debootstrap.log" 2>&1 \
    || die "debootstrap: see $WORK/debootstrap.log"
fi
rm -rf "$ROOT/src"; mkdir -p "$ROOT/src" "$ROOT/srv/audio" "$ROOT/srv/wheels" "$ROOT/usr/local/share/ca-certificates" \
  || die "mkdir in $ROOT"
tar -C "$SRC" --exclude=./.venv --exclude=./.git --exclude=./.mypy_cache --exclude=./.pytest_cache \
  --exclude=./.ruff_cache --exclude='./*.egg-info' --exclude=./build -cf - . | tar -C "$ROOT/src" -xf - \
  || die "copying $SRC"
cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/" 2>/dev/null || true  # TLS-intercepting proxies
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"; echo "$MACHINE" > "$ROOT/etc/hostname"

# audio: ~38 s of real speech (short.wav) and ten of it (long.wav), 16 kHz mono
make_audio() {
  local s=$SRC/tests/data/speech t=$WORK/wav f parts=()
  mkdir -p "$t" && sox -n -r 16000 -c 1 -b 16 "$t/sil.wav" trim 0 1.5 || return 1
  for f in beckett espeak-five-sentences; do sox "$s/$f.wav" -r 16000 -c 1 -b 16 "$t/$f.wav" || return 1; done
  sox "$t/beckett.wav" "$t/sil.wav" "$t/espeak-five-sentences.wav" "$t/sil.wav" "$t/short.wav" || return 1
  for _ in $(seq 10); do parts+=("$t/short.wav"); done
  sox "${parts[@]}" "$t/long.wav" && cp "$t/short.wav" "$t/long.wav" "$ROOT/srv/audio/" \
    && chmod 644 "$ROOT"/srv/audio/*.wav
}
make_audio > "$WORK/sox.log" 2>&1 || die "preparing the audio: see $WORK/sox.log"

# README: a venv in /opt (outside ProtectHome), install-service --system as root; a user's own
# venv (from a wheel: /src is root's) and install-service --user. Units and configs rewritten.
# shellcheck disable=SC2016  # expanded inside the container
chroot_run '
  set -e
  update-ca-certificates >/dev/null 2>&1 || true
  export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CERT=/etc/ssl/certs/ca-certificates.crt
  [ -x /opt/transcribed/bin/pip ] || python3 -m venv /opt/transcribed
  /opt/transcribed/bin/pip install -q "/src[local]"
  /opt/transcribed/bin/pip install -q --force-reinstall --no-deps /src
  rm -rf /src/build /src/*.egg-info
  rm -f /srv/wheels/transcribed-*.whl; /opt/transcribed/bin/pip wheel -q --no-deps -w /srv/wheels /src
  rm -rf /src/build /src/*.egg-info
  rm -rf /etc/systemd/system/transcribed.service /etc/transcribed
  # a hardened root umask: the config and its folder must still be readable by the dynamic user
  (umask 077; /opt/transcribed/bin/transcribed install-service --system > /srv/install-service.out 2>&1)
  id alice >/dev/null 2>&1 || useradd -m -s /bin/bash alice
  runuser -u alice -- env HOME=/home/alice bash -c "
    set -e; [ -x ~/venv/bin/pip ] || python3 -m venv ~/venv
    w=\$(ls /srv/wheels/transcribed-*.whl)
    ~/venv/bin/pip install -q \"transcribed[local] @ file://\$w\"
    ~/venv/bin/pip install -q --force-reinstall --no-deps \"\$w\"
    rm -f ~/.config/systemd/user/transcribed.service ~/.config/transcribed/config.toml
    ~/venv/bin/transcribed install-service --user > ~/install-service.out 2>&1"
' > "$WORK/setup.log" || die "installing the project in $ROOT: see $WORK/setup.log"
cp "$ROOT/srv/install-service.out" "$WORK/" 2>/dev/null

SU=$ROOT/etc/systemd/system/$U.service SC=$ROOT/etc/transcribed/config.toml
AU=$ROOT/home/alice/.config/systemd/user/$U.service A=$ROOT/home/alice/.config/transcribed/config.toml
check "setup: transcribed installed in /opt/transcribed" test -x "$ROOT/opt/transcribed/bin/transcribed"
check "install-service --system wrote the unit" test -f "$SU"
check "install-service --system: ExecStart is the venv's transcribed" \
  grep -qx 'ExecStart=/opt/transcribed/bin/transcribed run' "$SU"
check "install-service --system wrote /etc/transcribed/config.toml (sink in StateDirectory)" \
  grep -q '^path = "/var/lib/transcribed/turns.jsonl"' "$SC"
sys_config_readable() {  # the dynamic user is "other"
  [[ $(stat -c %a "$SC") == 644 ]] && (( 0$(stat -c %a "$ROOT/etc/transcribed") & 05 ))
}
check "install-service --system: config mode $(stat -c %a "$SC") (0644), dir $(stat -c %a "$ROOT/etc/transcribed"): readable by the dynamic user" \
  sys_config_readable
check "install-service --user wrote alice's unit" test -f "$AU"
check "install-service --user: ExecStart is alice's venv" grep -qx 'ExecStart=/home/alice/venv/bin/transcribed run' "$AU"
alice_uid=$(awk -F: '$1 == "alice" { print $3 }' "$ROOT/etc/passwd")   # the container's, not the host's
alice_config_private() { [[ $(stat -c '%a %u' "$A") == "600 $alice_uid" ]]; }
check "install-service --user: alice's config mode $(stat -c %a "$A") (0600), owned by alice" alice_config_private
no_pre() { ! grep -q '^ExecStartPre=' "$SU" "$AU"; }
check "the installed units have no ExecStartPre= (run checks the config itself)" no_pre

# configure for an offline run (README: delete LoadCredential= for the offline engine)
cp "$SU" "$WORK/unit.generated.service"
cp "$SC" "$WORK/config.generated.toml"
offline() {  # offline FILE WAV: file source, local engine
  sed -i -e 's|^source = "microphone" |source = "file"       |' -e "s|^path = \"\"  |path = \"$2\"|" \
         -e 's|^engine = "auto"  |engine = "local" |' "$1"
  grep -q '^source = "file"' "$1" && grep -q "^path = \"$2\"" "$1" && grep -q '^engine = "local"' "$1"
}
check "config edited (file source, local engine)" offline "$SC" /srv/audio/long.wav
cp "$SC" "$WORK/config.long.toml"
sed 's|/srv/audio/long.wav|/srv/audio/short.wav|' "$WORK/config.long.toml" > "$WORK/config.short.toml"
offline "$A" /srv/audio/long.wav && sed -i 's|^listen = "127.0.0.1:8765"|listen = "127.0.0.1:8766"|' "$A"
cp "$A" "$WORK/alice.config.toml"
sed '/^LoadCredential=/d' "$WORK/unit.generated.service" > "$SU"
rm -rf "$SU.d" "$ROOT/var/lib/private/transcribed" "$ROOT/var/cache/private/transcribed"
chroot_run "systemctl enable $U.service" > /dev/null || die "systemctl enable $U.service"

# --- boot (no network) ----------------------------------------------------------------------------
echo "== boot: systemd-nspawn -b --private-network"
(setsid systemd-nspawn -b -D "$ROOT" --register=no --keep-unit --private-network --machine="$MACHINE" \
   --console=pipe < /dev/null > "$WORK/boot.log" 2>&1 & echo $! > "$PIDFILE")
booted() { [[ $(in_c systemctl is-system-running 2>/dev/null) =~ ^(running|degraded)$ ]]; }
wait_for 90 booted || die "the container did not boot: see $WORK/boot.log"
info "container booted: $(in_c systemctl --version | head -1), system $(in_c systemctl is-system-running)"
nets=$(in_c ls /sys/class/net | tr '\n' ' ')
check "private network (only lo): $nets" test "$nets" = "lo "

# --- system unit ----------------------------------------------------------------------------------
echo "== system unit"
not_activating() { ! is_state activating; }
wait_for 90 not_activating
running() { is_state active && [[ $(sp SubState) == running ]]; }
check "enabled unit started at boot, Type=notify reached active (running)" running
check "the loaded unit has no ExecStartPre" test -z "$(sp ExecStartPre)"
ready_logged() { (( $(inv_count '"event": "daemon.ready"') )); }
check "READY=1 came from the daemon (daemon.ready logged)" wait_for 10 ready_logged
status_ready() { [[ $(sp StatusText) == "local: ready"* ]]; }
check "STATUS= shown by systemctl status: $(sp StatusText)" status_ready
two_turns() { (( $(n_turns) >= 2 )); }
wait_for 60 two_turns
check "turns arrive in /var/lib/transcribed/turns.jsonl ($(n_turns) so far)" two_turns
state_dir_private() {
  local uid; uid=$(in_c stat -c %u "/proc/$(sp MainPID)")
  [[ $uid != 0 && $(in_c stat -c "%a %u" /var/lib/private/transcribed) == "700 $uid" &&
     $(in_c stat -c %a /var/lib/private/transcribed/turns.jsonl) == 600 ]]
}
check "StateDirectory 0700 owned by the dynamic user, file 0600" state_dir_private
turns_json() {
  inv_journal | grep -q turn.completed &&
    inv_journal | grep turn.completed | head -3 | python3 -c 'import json,sys; [json.loads(l) for l in sys.stdin]'
}
check "journal: turn lines are JSON" turns_json
native=$(inv_journal | grep -c -E 'cpuinfo|W:onnxruntime')
check "no native-library warnings in the journal ($native cpuinfo/onnxruntime lines; no ProcSubset=pid)" test "$native" = 0
check "live view /healthz answers 200 inside the container" in_c /opt/transcribed/bin/python3 -c '
import urllib.request as u; assert u.urlopen("http://127.0.0.1:8765/healthz", timeout=5).status == 200'

pid=$(sp MainPID)
same_daemon() { [[ $(sp MainPID) == "$pid" ]] && is_state active; }
n_applied() { inv_count '"event": "reload.applied"'; }
n_rejected() { inv_count '"event": "reload.rejected"'; }
n0=$(n_applied)
in_c systemctl reload "$U"
more_applied() { (( $(n_applied) > n0 )); }
check "reload (SIGHUP): reload.applied logged, same PID, still active" \
  both "wait_for 15 more_applied" same_daemon
sed -i 's/^chunk_ms = 100 /chunk_ms = 5   /' "$SC"
in_c systemctl reload "$U"
any_rejected() { (( $(n_rejected) )); }
one_rejected() { (( $(n_rejected) == 1 )); }
check "reload with chunk_ms = 5: reload.rejected, one line, service keeps running" \
  both "wait_for 15 any_rejected" one_rejected same_daemon
cp "$WORK/config.long.toml" "$SC"

# the watchdog (WatchdogSec=30) must not kill a healthy daemon: an absence, so a bounded window,
# 70 s from the start (two watchdog periods and then some), failing early if the daemon changes
since=$(( $(date +%s) - $(date -d "$(sp ActiveEnterTimestamp)" +%s) ))
(( since < 70 )) && holds $((70 - since)) same_daemon
wd=$(date -d "$(sp WatchdogTimestamp)" +%s)
healthy() { same_daemon && [[ $(sp NRestarts) == 0 ]] && (( $(date +%s) - wd <= 30 )); }
check "watchdog: healthy daemon not killed after >=70 s (NRestarts=$(sp NRestarts), last ping $(( $(date +%s) - wd )) s ago)" healthy

t0=$(ms); in_c systemctl stop "$U"; t1=$(ms)
stopped_clean() { [[ $(sp Result) == success && $(sp ExecMainStatus) == 0 ]] && (( t1 - t0 < 30000 )); }
check "stop: clean within TimeoutStopSec ($(( (t1 - t0) / 1000 )).$(( (t1 - t0) % 1000 / 100 )) s, Result=$(sp Result), status=$(sp ExecMainStatus))" \
  stopped_clean

c=$(jcursor)
in_c systemctl start "$U"; in_c kill -STOP "$(sp MainPID)"
restarted_once() { [[ $(sp NRestarts) == 1 ]]; }
wd_logged() { jafter "$c" -u "$U" | grep -q "Watchdog timeout"; }
wait_for 60 restarted_once
check "watchdog: a frozen daemon (SIGSTOP) is killed after WatchdogSec and restarted (NRestarts=$(sp NRestarts))" \
  both restarted_once "wait_for 10 wd_logged"
in_c systemctl stop "$U"

cp "$WORK/config.short.toml" "$SC"
inv0=$(sp InvocationID)
in_c systemctl start "$U"
wait_for 150 ended sp "$inv0"
exited_0() { [[ $(sp Result) == success && $(sp ExecMainStatus) == 0 ]]; }
check "end of the WAV: exits 0 (Result=$(sp Result), status=$(sp ExecMainStatus))" exited_0
check "end of the WAV: stays stopped (not restarted within RestartSec + 3 s)" holds "$RESTART_WINDOW" stays sp inactive
st=$(sp StatusText)
status_ended() { [[ $st == "stopping (input ended); local: session ended"* ]]; }
check "STATUS after the end of the file: $st" status_ended

# a start that fails: exit STATUS, a journal line with PATTERN, and no restart
start_fails() {  # start_fails LABEL STATUS PATTERN
  local label=$1 status=$2 pattern=$3 c inv0 j
  in_c systemctl reset-failed "$U" 2>/dev/null
  c=$(jcursor) inv0=$(sp InvocationID)
  in_c systemctl start "$U" 2>/dev/null
  if ! wait_for 60 ended sp "$inv0"; then fail "$label: the start did not end ($(sp ActiveState))"; return; fi
  check "$label: exit $status (status=$(sp ExecMainStatus), Result=$(sp Result))" \
    test "$(sp ExecMainStatus)" = "$status"
  check "$label: not restarted within RestartSec + 3 s (RestartPreventExitStatus)" \
    holds "$RESTART_WINDOW" stays sp failed
  j=$(jafter "$c" -u "$U")
  check "$label: journal: $(grep -m1 -o -- "$pattern.*" <<< "$j") ($(grep -c -- "$pattern" <<< "$j") line(s))" \
    test "$(grep -c -- "$pattern" <<< "$j")" = 1
  in_c systemctl stop "$U"; in_c systemctl reset-failed "$U" 2>/dev/null
}
bad_config() {  # bad_config LABEL SED-EXPR
  cp "$WORK/config.short.toml" "$SC"; sed -i "$2" "$SC"
  start_fails "$1" 78 "config error"
}
bad_config "chunk_ms = 5" 's/^chunk_ms = 100 /chunk_ms = 5   /'
bad_config "unknown key" 's/^stall_seconds = 5.0 /stall_secs = 5.0    /'
cp "$WORK/config.short.toml" "$SC"

cp "$WORK/unit.generated.service" "$SU"; in_c systemctl daemon-reload
start_fails "LoadCredential= and no key file" 243 "Failed to set up credentials"
sed '/^LoadCredential=/d' "$WORK/unit.generated.service" > "$SU"; in_c systemctl daemon-reload

exp=$(in_c systemd-analyze security "$U" --no-pager | grep -o 'exposure level for [^:]*: [0-9.]*' | awk '{print $NF}')
check "systemd-analyze security: exposure ${exp:-?} (<= 2.0)" le "${exp:-9}" 2.0

# the syscalls the daemon makes (strace outside the sandbox, as an unprivileged user) that the
# unit's SystemCallFilter denies (EPERM)
cat > "$ROOT/srv/expand.py" <<'EOF'
import functools, subprocess, sys
@functools.lru_cache(None)
def group(g):
    out = subprocess.run(["systemd-analyze", "syscall-filter", "--no-pager", g], capture_output=True, text=True).stdout
    s = set()
    for t in (l.strip() for l in out.splitlines()[1:]):
        if t and not t.startswith("#"):
            s |= group(t) if t.startswith("@") else {t}
    return frozenset(s)
allowed = group("@system-service") - group("@privileged") - group("@resources")
used = set(open(sys.argv[1]).read().split())
print(" ".join(sorted(used - allowed)) or "none")
EOF
# shellcheck disable=SC2016  # expanded inside the container
denied=$(in_c runuser -u alice -- env HOME=/tmp TRANSCRIBED_CONFIG=/etc/transcribed/config.toml XDG_CACHE_HOME=/tmp/xc \
  TRANSCRIBED_HTTP__ENABLED=false TRANSCRIBED_SINKS__JOURNAL__PATH=/tmp/strace-turns.jsonl STATE_DIRECTORY=/tmp \
  bash -c 'cd /tmp; timeout 25 strace -f -qq -o /tmp/st.txt /opt/transcribed/bin/transcribed run >/dev/null 2>&1;
    grep -oE "^[0-9]+ +[a-z_0-9]+\(" /tmp/st.txt | sed -E "s/^[0-9]+ +//; s/\($//" | sort -u > /tmp/st.names;
    python3 /srv/expand.py /tmp/st.names')
check "SystemCallFilter: denied syscalls the daemon uses: [$denied] (expected: mbind, OpenBLAS NUMA hint, harmless with EPERM)" \
  one_of "$denied" mbind none

mkdir -p "$SU.d"
printf '[Service]\nMemoryDenyWriteExecute=yes\nRestart=no\n' > "$SU.d/check-mdwe.conf"
in_c systemctl daemon-reload; in_c systemctl start "$U" 2>/dev/null
down() { ! is_state active && ! is_state activating; }
jit_failed() { inv_journal | grep -q "could not create a primitive"; }
wait_for 60 down
check "README: MemoryDenyWriteExecute=yes breaks the local engine (CTranslate2/oneDNN JIT), hence left out" \
  wait_for 10 jit_failed
rm -rf "$SU.d"; in_c systemctl daemon-reload; in_c systemctl reset-failed "$U" 2>/dev/null
cp "$WORK/config.long.toml" "$SC"

# --- user unit, lingering ---------------------------------------------------------------------------
echo "== user unit (alice, loginctl enable-linger)"
in_c loginctl enable-linger alice
manager_up() { [[ $(in_c systemctl is-active "user@$alice_uid.service") == active ]]; }
check "lingering user manager running" wait_for 30 manager_up
ujournal() { as_alice "journalctl --user -u $U --no-pager -o cat -q"; }
as_alice "rm -f ~/transcripts/turns.jsonl; systemctl --user daemon-reload; systemctl --user enable --now $U.service" >/dev/null 2>&1
alice_two() { (( $(alice_turns) >= 2 )); }
user_active() { [[ $(us ActiveState) == active ]]; }
wait_for 60 alice_two
check "user unit active (running), $(alice_turns) turns in ~/transcripts/turns.jsonl, status: $(us StatusText)" \
  both user_active alice_two
u_applied() { ujournal | grep -c reload.applied; }
u_more_applied() { (( $(u_applied) > u0 )); }
u0=$(u_applied)
as_alice "systemctl --user reload $U"
check "user unit reload applied" wait_for 15 u_more_applied
as_alice "systemctl --user stop $U; systemctl --user disable $U" >/dev/null 2>&1
user_clean() { [[ $(us Result) == success && $(us ExecMainStatus) == 0 ]]; }
user_quiet() { ! ujournal | grep -q -E "cpuinfo|W:onnxruntime"; }
check "user unit stops cleanly (Result=$(us Result), status=$(us ExecMainStatus))" user_clean
check "user unit: no native-library warnings" user_quiet
sed -i 's/^chunk_ms = 100 /chunk_ms = 5   /' "$A"
inv0=$(us InvocationID)
as_alice "systemctl --user start $U" >/dev/null 2>&1
if wait_for 60 ended us "$inv0"; then
  check "user unit, chunk_ms = 5: exit 78 (status=$(us ExecMainStatus))" test "$(us ExecMainStatus)" = 78
  check "user unit, chunk_ms = 5: not restarted within RestartSec + 3 s" holds "$RESTART_WINDOW" stays us failed
else
  fail "user unit, chunk_ms = 5: the start did not end ($(us ActiveState))"
fi
as_alice "systemctl --user stop $U; systemctl --user reset-failed $U" >/dev/null 2>&1
cp "$WORK/alice.config.toml" "$A"
in_c loginctl disable-linger alice

# --- finish (the EXIT trap stops the container unless KEEP=1) -------------------------------------
echo "== $NPASS passed, $NFAIL failed"
exit $((NFAIL > 0))
