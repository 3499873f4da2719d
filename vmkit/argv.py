"""QEMU command lines, as pure functions of a spec and a host.

Nothing here probes, spawns or writes: tests assert the exact argv for macOS/hvf, Windows/whpx,
Linux/kvm and tcg without running QEMU.
"""

from __future__ import annotations

from agent.engine_port import PORT_NAME as ENGINE_PORT_NAME
from vmkit.host import Host
from vmkit.spec import Accel, Arch, NicModel, Protocol, VMSpec, qemu_escape

AGENT_PORT_NAME = "org.pydesk.agent"
SHARE_PORT_PREFIX = "org.pydesk.share."
FW_CFG_PREFIX = "opt/org.pydesk"
DATA_DRIVE = "data"  # the data disk's drive id: QMP names it so (query-blockstats, throttling)

#: Kernel options shared by every boot: quiet, no waiting for slow hardware checks.
KERNEL_CMDLINE = ("quiet", "loglevel=4", "panic=-1", "i8042.noaux", "i8042.nopnp", "cryptomgr.notests",
                  "rcupdate.rcu_expedited=1", "random.trust_cpu=on")


def console_device(arch: Arch) -> str:
    return {Arch.X86_64: "ttyS0", Arch.AARCH64: "ttyAMA0"}[arch]


def nic_model(arch: Arch, accel: Accel) -> NicModel:
    """virtio-net, except x86_64 under TCG: QEMU's user network has no virtio-net offloads
    (no vnet header), so the guest would checksum and segment every packet itself, emulated.
    QEMU's vmxnet3 takes checksums and TSO from the guest and does them natively: measured
    3x the throughput under TCG, and it keeps big packets through the container bridge. With
    a hardware accelerator the guest's own work is cheap and virtio's fewer exits win."""
    return NicModel.VMXNET3 if arch is Arch.X86_64 and accel is Accel.TCG else NicModel.VIRTIO


def machine_args(arch: Arch, accel: Accel, host: Host) -> list[str]:
    if arch is Arch.X86_64:
        machine = "q35,vmport=off"
    elif accel is Accel.HVF:
        machine = "virt,highmem=on"
    else:
        machine = "virt,gic-version=max"
    return ["-machine", machine]


def accel_args(arch: Arch, accel: Accel, host: Host) -> list[str]:
    if accel is Accel.TCG:
        # multi-threaded TCG: one host thread per vCPU.
        return ["-accel", "tcg,thread=multi,tb-size=256", "-cpu", "max"]
    if accel is Accel.WHPX:
        # The in-kernel irqchip of WHPX is unreliable with Linux guests.
        return ["-accel", "whpx,kernel-irqchip=off", "-cpu", "max"]
    return ["-accel", str(accel), "-cpu", "host"]


def _common(arch: Arch, accel: Accel, host: Host) -> list[str]:
    return [
        host.qemu_binary(arch),
        "-nodefaults", "-no-user-config", "-display", "none",
        *machine_args(arch, accel, host),
        *accel_args(arch, accel, host),
    ]


def qemu_argv(spec: VMSpec, host: Host) -> list[str]:
    """The full QEMU command line for ``spec`` on ``host``."""
    f = spec.files
    console = console_device(spec.arch)
    cmdline = [f"console={console}", *KERNEL_CMDLINE]
    argv = _common(spec.arch, spec.accel, host) + [
        "-name", f"pydesk-{spec.name}",
        "-smp", str(spec.cpus),
        "-m", f"{spec.memory_mib}M",
        "-no-reboot",
        "-pidfile", str(f.pidfile),
        "-kernel", str(spec.image.kernel),
        "-initrd", str(spec.image.initrd),
        "-append", " ".join(cmdline),
        # Serial console to a file: boot messages for `pydesk vm logs`.
        "-chardev", f"file,id=console,path={qemu_escape(str(f.console_log))}",
        "-serial", "chardev:console",
        # QMP: the daemon's control of QEMU.
        "-chardev", f"socket,id=qmp,{f.qmp.chardev_opts()},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        # The agent channel: a virtio-serial port; the daemon speaks SSH over it.
        "-device", "virtio-serial-pci,id=vser",
        "-chardev", f"socket,id=agent,{f.agent.chardev_opts()},server=on,wait=off",
        "-device", f"virtserialport,bus=vser.0,chardev=agent,name={AGENT_PORT_NAME}",
        # Keys and settings reach the guest through fw_cfg, not the kernel command line.
        "-fw_cfg", f"name={FW_CFG_PREFIX}/ssh_host_key,file={qemu_escape(str(f.host_key))}",
        "-fw_cfg", f"name={FW_CFG_PREFIX}/authorized_keys,file={qemu_escape(str(f.authorized_keys))}",
        "-fw_cfg", f"name={FW_CFG_PREFIX}/config,file={qemu_escape(str(f.guest_config))}",
    ]
    if spec.image.root_disk is not None:
        argv += [
            "-drive", f"if=none,id=root,file={qemu_escape(str(spec.image.root_disk))},format=raw,readonly=on",
            "-device", "virtio-blk-pci,drive=root,serial=pydesk-root",
        ]
    argv += [
        "-drive", f"if=none,id={DATA_DRIVE},file={qemu_escape(str(f.data_disk))},format=qcow2,discard=unmap",
        "-device", f"virtio-blk-pci,drive={DATA_DRIVE},serial=pydesk-data",
        "-netdev", netdev_opts(spec),
        "-device", f"{nic_model(spec.arch, spec.accel)},netdev=net0",
        "-device", "virtio-rng-pci",
    ]
    if f.engine_port is not None:
        # The Docker API's own port: one stream per client connection, no SSH on the way.
        argv += ["-chardev", f"socket,id=engine,{f.engine_port.chardev_opts()},server=on,wait=off",
                 "-device", f"virtserialport,bus=vser.0,chardev=engine,name={ENGINE_PORT_NAME}"]
    argv += share_port_args(spec)
    argv += virtiofs_args(spec)
    return argv


def share_port_name(index: int) -> str:
    return f"{SHARE_PORT_PREFIX}{index}"


def share_port_args(spec: VMSpec) -> list[str]:
    """A virtio-serial port per share not served by virtiofsd: SFTP for sshfs, nothing else
    on it (vmkit/sftp_share.py)."""
    argv: list[str] = []
    for i, share in enumerate(spec.shares):
        if share in spec.virtiofs:
            continue
        if i >= len(spec.files.share_ports):
            raise ValueError(f"share {share.host_path} has no port endpoint in RuntimeFiles.share_ports")
        argv += ["-chardev", f"socket,id=share{i},{spec.files.share_ports[i].chardev_opts()},server=on,wait=off",
                 "-device", f"virtserialport,bus=vser.0,chardev=share{i},name={share_port_name(i)}"]
    return argv


def virtiofs_args(spec: VMSpec) -> list[str]:
    """vhost-user-fs devices for the virtiofs shares; vhost-user needs guest memory that
    virtiofsd can map, so the RAM becomes a shared memfd backend on a NUMA node."""
    if not spec.virtiofs:
        return []
    d = spec.files.virtiofs_dir
    if d is None:
        raise ValueError("virtiofs shares need RuntimeFiles.virtiofs_dir")
    args = ["-object", f"memory-backend-memfd,id=mem,size={spec.memory_mib}M,share=on", "-numa", "node,memdev=mem"]
    for i, _share in enumerate(spec.virtiofs):
        sock = qemu_escape(str(d / f"virtiofs{i}.sock"))
        args += ["-chardev", f"socket,id=vfs{i},path={sock}",
                 "-device", f"vhost-user-fs-pci,chardev=vfs{i},tag=pydesk{i},queue-size=1024"]
    return args


def netdev_opts(spec: VMSpec) -> str:
    """QEMU user networking: no root needed on any host OS; forwards bound to loopback
    unless a port says otherwise."""
    opts = ["user", "id=net0", "ipv6=off"]
    if spec.restrict_network:
        opts.append("restrict=on")
    for p in spec.ports:
        proto = "udp" if p.protocol is Protocol.UDP else "tcp"
        opts.append(f"hostfwd={proto}:{p.host_ip}:{p.host_port}-:{p.guest_port}")
    return ",".join(opts)


def probe_argv(host: Host, arch: Arch, accel: Accel, kernel: str) -> list[str]:
    """A minimal boot for the accelerator probe: the kernel alone, printing to stdout.
    A working accelerator prints the kernel banner within a fraction of a second."""
    console = console_device(arch)
    return _common(arch, accel, host) + [
        "-m", "256M", "-no-reboot",
        "-serial", "stdio",
        "-kernel", kernel,
        "-append", f"console={console} earlycon panic=-1",
    ]

