"""The exact QEMU command line per host OS and accelerator (no QEMU is run)."""

from __future__ import annotations

from pathlib import PurePosixPath as P
from pathlib import PureWindowsPath as W

import pytest

from vmkit.argv import netdev_opts, probe_argv, qemu_argv
from vmkit.host import Host
from vmkit.spec import Accel, Arch, Endpoint, GuestImage, HostOS, PortForward, RuntimeFiles, VMSpec


def files_posix(base: str = "/s") -> RuntimeFiles:
    return RuntimeFiles(
        qmp=Endpoint(path="/r/qmp.sock"), agent=Endpoint(path="/r/agent.sock"),
        console_log=P(f"{base}/console.log"), data_disk=P(f"{base}/data.qcow2"),
        host_key=P(f"{base}/hk"), authorized_keys=P(f"{base}/ak"), guest_config=P(f"{base}/guest.conf"),
        pidfile=P(f"{base}/qemu.pid"), engine_port=Endpoint(path="/r/engine-port.sock"))


def spec_for(arch: Arch, accel: Accel, files: RuntimeFiles, img_base: str = "/img", ports=()) -> VMSpec:
    image = GuestImage(arch, "0.1+abc", P(f"{img_base}/vmlinuz"), P(f"{img_base}/boot.img"), P(f"{img_base}/root.erofs"))
    return VMSpec(name="default", arch=arch, cpus=2, memory_mib=2048, disk_gib=20, accel=accel,
                  image=image, files=files, ports=ports)


def tail(console: str, files: RuntimeFiles, img: str, sep: str = "/", nic: str = "virtio-net-pci") -> list[str]:
    f = files
    return [
        "-name", "pydesk-default", "-smp", "2", "-m", "2048M", "-no-reboot",
        "-pidfile", str(f.pidfile),
        "-kernel", f"{img}{sep}vmlinuz", "-initrd", f"{img}{sep}boot.img",
        "-append", f"console={console} quiet loglevel=4 panic=-1 i8042.noaux i8042.nopnp cryptomgr.notests "
                   "rcupdate.rcu_expedited=1 random.trust_cpu=on",
        "-chardev", f"file,id=console,path={f.console_log}", "-serial", "chardev:console",
        "-chardev", f"socket,id=qmp,{f.qmp.chardev_opts()},server=on,wait=off", "-mon", "chardev=qmp,mode=control",
        "-device", "virtio-serial-pci,id=vser",
        "-chardev", f"socket,id=agent,{f.agent.chardev_opts()},server=on,wait=off",
        "-device", "virtserialport,bus=vser.0,chardev=agent,name=org.pydesk.agent",
        "-fw_cfg", f"name=opt/org.pydesk/ssh_host_key,file={f.host_key}",
        "-fw_cfg", f"name=opt/org.pydesk/authorized_keys,file={f.authorized_keys}",
        "-fw_cfg", f"name=opt/org.pydesk/config,file={f.guest_config}",
        "-drive", f"if=none,id=root,file={img}{sep}root.erofs,format=raw,readonly=on",
        "-device", "virtio-blk-pci,drive=root,serial=pydesk-root",
        "-drive", f"if=none,id=data,file={f.data_disk},format=qcow2,discard=unmap",
        "-device", "virtio-blk-pci,drive=data,serial=pydesk-data",
        "-netdev", "user,id=net0,ipv6=off",
        "-device", f"{nic},netdev=net0",
        "-device", "virtio-rng-pci",
        *(["-chardev", f"socket,id=engine,{f.engine_port.chardev_opts()},server=on,wait=off",
           "-device", "virtserialport,bus=vser.0,chardev=engine,name=org.pydesk.engine"] if f.engine_port else []),
    ]


HEAD = ["-nodefaults", "-no-user-config", "-display", "none"]


def test_linux_kvm_x86_64() -> None:
    f = files_posix()
    argv = qemu_argv(spec_for(Arch.X86_64, Accel.KVM, f), Host(HostOS.LINUX, Arch.X86_64))
    assert argv == ["qemu-system-x86_64", *HEAD, "-machine", "q35,vmport=off", "-accel", "kvm", "-cpu", "host",
                    *tail("ttyS0", f, "/img")]


def test_linux_tcg_x86_64() -> None:
    f = files_posix()
    argv = qemu_argv(spec_for(Arch.X86_64, Accel.TCG, f), Host(HostOS.LINUX, Arch.X86_64))
    assert argv == ["qemu-system-x86_64", *HEAD, "-machine", "q35,vmport=off",
                    "-accel", "tcg,thread=multi,tb-size=256", "-cpu", "max",
                    *tail("ttyS0", f, "/img", nic="vmxnet3")]  # offloads done by QEMU, not emulated


def test_macos_intel_hvf() -> None:
    f = files_posix()
    host = Host(HostOS.DARWIN, Arch.X86_64, P("/usr/local/bin"))
    argv = qemu_argv(spec_for(Arch.X86_64, Accel.HVF, f), host)
    assert argv == ["/usr/local/bin/qemu-system-x86_64", *HEAD, "-machine", "q35,vmport=off",
                    "-accel", "hvf", "-cpu", "host", *tail("ttyS0", f, "/img")]


def test_macos_apple_silicon_hvf() -> None:
    f = files_posix()
    host = Host(HostOS.DARWIN, Arch.AARCH64, P("/opt/homebrew/bin"))
    argv = qemu_argv(spec_for(Arch.AARCH64, Accel.HVF, f), host)
    assert argv == ["/opt/homebrew/bin/qemu-system-aarch64", *HEAD, "-machine", "virt,highmem=on",
                    "-accel", "hvf", "-cpu", "host", *tail("ttyAMA0", f, "/img")]


def test_linux_aarch64_tcg_on_x86_host() -> None:
    f = files_posix()
    argv = qemu_argv(spec_for(Arch.AARCH64, Accel.TCG, f), Host(HostOS.LINUX, Arch.X86_64))
    assert argv[:9] == ["qemu-system-aarch64", *HEAD, "-machine", "virt,gic-version=max", "-accel",
                         "tcg,thread=multi,tb-size=256"]


def test_windows_whpx() -> None:
    f = RuntimeFiles(
        qmp=Endpoint(port=50001), agent=Endpoint(port=50002),
        console_log=W(r"C:\Users\me\AppData\Local\pydesk\console.log"),
        data_disk=W(r"C:\Users\me\AppData\Local\pydesk\data.qcow2"),
        host_key=W(r"C:\Users\me\AppData\Local\pydesk\hk"), authorized_keys=W(r"C:\Users\me\AppData\Local\pydesk\ak"),
        guest_config=W(r"C:\Users\me\AppData\Local\pydesk\guest.conf"),
        pidfile=W(r"C:\Users\me\AppData\Local\pydesk\qemu.pid"), engine_port=Endpoint(port=50003))
    image = GuestImage(Arch.X86_64, "0.1+abc", W(r"C:\pd\img\vmlinuz"), W(r"C:\pd\img\boot.img"), W(r"C:\pd\img\root.erofs"))
    spec = VMSpec(name="default", arch=Arch.X86_64, cpus=2, memory_mib=2048, disk_gib=20, accel=Accel.WHPX,
                  image=image, files=f)
    host = Host(HostOS.WINDOWS, Arch.X86_64, W(r"C:\Program Files\qemu"))
    argv = qemu_argv(spec, host)
    assert argv == [r"C:\Program Files\qemu\qemu-system-x86_64.exe", *HEAD, "-machine", "q35,vmport=off",
                    "-accel", "whpx,kernel-irqchip=off", "-cpu", "max", *tail("ttyS0", f, r"C:\pd\img", "\\")]
    # TCP loopback chardevs instead of unix sockets
    assert "socket,id=qmp,host=127.0.0.1,port=50001,server=on,wait=off" in argv
    assert "socket,id=agent,host=127.0.0.1,port=50002,server=on,wait=off" in argv
    assert "socket,id=engine,host=127.0.0.1,port=50003,server=on,wait=off" in argv


def test_commas_in_paths_are_escaped() -> None:
    f = files_posix("/home/a,b")
    argv = qemu_argv(spec_for(Arch.X86_64, Accel.TCG, f), Host(HostOS.LINUX, Arch.X86_64))
    assert "if=none,id=data,file=/home/a,,b/data.qcow2,format=qcow2,discard=unmap" in argv


def test_initramfs_layout_has_no_root_disk() -> None:
    f = files_posix()
    image = GuestImage(Arch.X86_64, "r", P("/img/vmlinuz"), P("/img/initrd.img"))
    spec = VMSpec(name="default", arch=Arch.X86_64, cpus=1, memory_mib=512, disk_gib=1, accel=Accel.TCG, image=image, files=f)
    argv = qemu_argv(spec, Host(HostOS.LINUX, Arch.X86_64))
    assert "serial=pydesk-root" not in " ".join(argv)
    assert argv[argv.index("-initrd") + 1] == "/img/initrd.img"


@pytest.mark.parametrize(("ports", "restrict", "expected"), [
    ((), False, "user,id=net0,ipv6=off"),
    ((), True, "user,id=net0,ipv6=off,restrict=on"),
    ((PortForward.parse("8080:80"), PortForward.parse("0.0.0.0:5353:53/udp")), False,
     "user,id=net0,ipv6=off,hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=udp:0.0.0.0:5353-:53"),
])
def test_netdev(ports, restrict, expected) -> None:
    import dataclasses

    spec = dataclasses.replace(spec_for(Arch.X86_64, Accel.TCG, files_posix()), ports=ports, restrict_network=restrict)
    assert netdev_opts(spec) == expected


def test_probe_argv() -> None:
    argv = probe_argv(Host(HostOS.LINUX, Arch.X86_64), Arch.X86_64, Accel.KVM, "/img/vmlinuz")
    assert argv == ["qemu-system-x86_64", *HEAD, "-machine", "q35,vmport=off", "-accel", "kvm", "-cpu", "host",
                    "-m", "256M", "-no-reboot", "-serial", "stdio", "-kernel", "/img/vmlinuz",
                    "-append", "console=ttyS0 earlycon panic=-1"]


def test_linux_virtiofs_shares() -> None:
    """Linux fast path: RAM as a shared memfd on a NUMA node, one vhost-user-fs per share."""
    import dataclasses

    from vmkit.spec import Share

    f = dataclasses.replace(files_posix(), virtiofs_dir=P("/r,x"))
    shares = (Share("/home/me", "/home/me"), Share("/srv/data", "/srv/data"))
    spec = dataclasses.replace(spec_for(Arch.X86_64, Accel.KVM, f), shares=shares, virtiofs=shares)
    argv = qemu_argv(spec, Host(HostOS.LINUX, Arch.X86_64))
    plain = qemu_argv(dataclasses.replace(spec, shares=(), virtiofs=()), Host(HostOS.LINUX, Arch.X86_64))
    assert argv[:len(plain)] == plain
    assert argv[len(plain):] == [
        "-object", "memory-backend-memfd,id=mem,size=2048M,share=on", "-numa", "node,memdev=mem",
        "-chardev", "socket,id=vfs0,path=/r,,x/virtiofs0.sock",
        "-device", "vhost-user-fs-pci,chardev=vfs0,tag=pydesk0,queue-size=1024",
        "-chardev", "socket,id=vfs1,path=/r,,x/virtiofs1.sock",
        "-device", "vhost-user-fs-pci,chardev=vfs1,tag=pydesk1,queue-size=1024",
    ]


@pytest.mark.parametrize("os_", [HostOS.DARWIN, HostOS.WINDOWS])
def test_sftp_shares_get_a_virtio_serial_port_each(os_: HostOS) -> None:
    """macOS and Windows have no virtiofsd: each share is SFTP on a port of its own (a unix
    socket chardev on macOS, loopback TCP on Windows), on the agent's virtio-serial bus."""
    import dataclasses

    from vmkit.settings import Settings
    from vmkit.spec import Share
    from vmkit.vm import virtiofs_shares

    shares = (Share("/Users/me", "/Users/me"), Share("/data", "/data", read_only=True))
    assert virtiofs_shares(Settings(), shares, os_) == ()
    ports = ((Endpoint(path="/r/share0.sock"), Endpoint(path="/r/share1.sock")) if os_ is HostOS.DARWIN
             else (Endpoint(port=50001), Endpoint(port=50002)))
    files = dataclasses.replace(files_posix(), share_ports=ports)
    spec = dataclasses.replace(spec_for(Arch.X86_64, Accel.TCG, files), shares=shares)
    argv = qemu_argv(spec, Host(os_, Arch.X86_64))
    plain = qemu_argv(dataclasses.replace(spec, shares=()), Host(os_, Arch.X86_64))
    assert not any("vhost-user-fs" in a or "memfd" in a for a in argv)
    assert argv[:len(plain)] == plain
    where = (["path=/r/share0.sock", "path=/r/share1.sock"] if os_ is HostOS.DARWIN
             else ["host=127.0.0.1,port=50001", "host=127.0.0.1,port=50002"])
    assert argv[len(plain):] == [
        "-chardev", f"socket,id=share0,{where[0]},server=on,wait=off",
        "-device", "virtserialport,bus=vser.0,chardev=share0,name=org.pydesk.share.0",
        "-chardev", f"socket,id=share1,{where[1]},server=on,wait=off",
        "-device", "virtserialport,bus=vser.0,chardev=share1,name=org.pydesk.share.1",
    ]
    with pytest.raises(ValueError, match="no port endpoint"):
        qemu_argv(dataclasses.replace(spec, files=files_posix()), Host(os_, Arch.X86_64))
