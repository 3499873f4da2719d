#!/bin/sh
# Early boot: file systems, modules, keys from fw_cfg, the data disk, the uplink.
# Everything here runs before the agent port opens, so keep it short.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
log() { read -r up _ < /proc/uptime; echo "[$up] pydesk-guest: $*" > /dev/console; }

[ -e /proc/self ] || mount -t proc proc /proc
[ -d /sys/kernel ] || mount -t sysfs sysfs /sys
grep -q "^devtmpfs /dev " /proc/mounts || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
# Pure cgroup v2: crun and the engine rely on it.
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
ln -sf /proc/self/fd /dev/fd
log "file systems mounted"

modprobe -a $(cat /etc/pydesk/modules.boot) 2>/dev/null || log "some modules failed to load"

log "boot modules loaded"
mkdir -p /run/pydesk /run/sshd /var/log
chmod 755 /run/sshd
fw=/sys/firmware/qemu_fw_cfg/by_name/opt/org.pydesk
for _ in 1 2 3 4 5 6 7 8 9 10; do [ -e "$fw/authorized_keys/raw" ] && break; sleep 0.1; done
cp "$fw/ssh_host_key/raw" /run/pydesk/ssh_host_ed25519_key
cp "$fw/authorized_keys/raw" /run/pydesk/authorized_keys
[ -e "$fw/config/raw" ] && cp "$fw/config/raw" /run/pydesk/config
chmod 600 /run/pydesk/ssh_host_ed25519_key /run/pydesk/authorized_keys

log "keys in place"
# The data disk (virtio-blk, serial "pydesk-data") is formatted only when blank:
# a disk whose file system fails to mount is repaired, never re-created.
data=
for b in /sys/block/vd*; do
  [ "$(cat "$b/serial" 2>/dev/null)" = pydesk-data ] && data=/dev/${b##*/}
done
mkdir -p /var/lib/pydesk
if [ -n "$data" ]; then
  magic=$(dd if="$data" bs=1 skip=1080 count=2 2>/dev/null | od -An -tx1 | tr -d ' \n')
  if [ "$magic" != "53ef" ]; then
    if [ -z "$(dd if="$data" bs=4096 count=256 2>/dev/null | tr -d '\000' | head -c1)" ]; then
      log "formatting blank data disk $data"
      mkfs.ext4 -q -F -L pydesk-data -E lazy_itable_init=1,lazy_journal_init=1 "$data"
    else
      log "data disk $data holds something that is not ext4; not touching it"
    fi
  fi
  mount -t ext4 -o noatime "$data" /var/lib/pydesk 2>/dev/null || {
    log "data disk needs a check"; e2fsck -p "$data"; mount -t ext4 -o noatime "$data" /var/lib/pydesk; } \
    || log "data disk could not be mounted"
else
  log "no data disk attached"
fi

hostname pydesk
ip link set lo up
# QEMU user networking: fixed addresses, so no DHCP round trip at boot.
if [ -e /sys/class/net/eth0 ]; then
  ip link set eth0 up
  ip addr add 10.0.2.15/24 dev eth0
  ip route add default via 10.0.2.2
fi
# DNS: QEMU's resolver at 10.0.2.3 asks the host's own resolver for every query (so a VPN or
# split DNS on the host just works), unless `pydesk vm start --dns` named servers.
sed -n 's/^dns=/nameserver /p' /run/pydesk/config 2>/dev/null > /run/resolv.conf
[ -s /run/resolv.conf ] || echo "nameserver 10.0.2.3" > /run/resolv.conf
log "boot done"
