"""PID 1 of every test guest: a busybox shell script that supervises one service and obeys the command port.

It mounts /proc, /sys and /dev, prints the kernel's boot id on the console (the test tells boots apart by it),
loads the modules the image carries, runs the guest's own setup, then runs the service under a restart loop (as
systemd's Restart=always would) with its pid in /run/<service>.pid. The second serial port (ttyS1), which the
host side exposes as a unix socket, takes one-word commands: ``hang-<service>`` SIGSTOPs the service while the
guest runs on; this is how the test makes a guest's answering part hang without any other channel into it.
``break-app`` creates /run/app-broken, which the test's application liveness check (``test ! -e
/run/app-broken``) fails on until the next boot clears /run.
"""

from __future__ import annotations


def init_script(service: str, command: str, modules: str = "", setup: str = "") -> str:
    """The /init text: ``modules`` and ``setup`` are shell lines run once, ``command`` the supervised service
    (run in the background, restarted 1 s after it exits), ``service`` its one-word name."""
    return f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /run
echo "vmq-guest: boot_id $(cat /proc/sys/kernel/random/boot_id)"
{modules}
{setup}
supervise() {{
  while true; do
    {command} &
    echo $! > /run/{service}.pid
    wait $!
    echo "vmq-guest: {service} exited ($?), restarting in 1 s"
    sleep 1
  done
}}
supervise &
commands() {{
  stty -F /dev/ttyS1 raw -echo 2>/dev/null
  while read -r command < /dev/ttyS1; do
    case "$command" in
      hang-{service}) echo "vmq-guest: SIGSTOP {service} $(cat /run/{service}.pid)"
                      kill -STOP "$(cat /run/{service}.pid)" ;;
      break-app) touch /run/app-broken
                 echo "vmq-guest: app broken" ;;
      *) echo "vmq-guest: unknown command $command" ;;
    esac
  done
}}
[ -e /dev/ttyS1 ] && commands &
echo "vmq-guest: up"
while true; do sleep 3600; done
"""


def wait_for_virtio_port(name: str, variable: str) -> str:
    """Shell lines that wait (up to 20 s) for the virtio-serial port ``name`` and set ``$variable`` to its
    /dev/vportNpM, found by ``/sys/class/virtio-ports/*/name`` (no udev in these guests)."""
    return f"""{variable}=""
for _ in $(seq 1 200); do
  for sysport in /sys/class/virtio-ports/*; do
    [ "$(cat "$sysport/name" 2>/dev/null)" = "{name}" ] && {variable}="/dev/${{sysport##*/}}"
  done
  [ -n "${variable}" ] && [ -e "${variable}" ] && break
  sleep 0.1
done
echo "vmq-guest: port {name} is ${{{variable}:-missing}}"
"""
