//! The boot path in one place: create the VM, guest memory, devices and
//! vCPUs, load the kernel and initramfs, write the boot structures; then
//! [`Microvm::run`] starts the vCPU threads and runs the event loop until
//! the guest resets or something fatal happens.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use linux_loader::loader::{elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::api::ApiServer;
use crate::arch::boot_params::{self, InitrdLocation};
use crate::arch::layout::{
    self, HIMEM_START, SERIAL_IRQ, VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE,
};
use crate::arch::{mptable, regs};
use crate::devices::bus::DeviceBus;
use crate::devices::serial::SerialDevice;
use crate::devices::virtio::balloon::Balloon;
use crate::devices::virtio::fs::dax::DaxWindow;
use crate::devices::virtio::fs::{self as virtio_fs, FsError, ShareConfig, VirtioFs};
use crate::devices::virtio::mmio::{MmioTransport, MmioTransportState, ShmRegion};
use crate::devices::virtio::net::{self as virtio_net, Net, NetBackend, NetConfig, NetError, Tap};
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::host::HostKind;
use crate::snapshot::{
    self, BalloonSlotState, FsSlotState, MicrovmState, NetSlotState, SnapshotError, VsockSlotState,
};
use crate::timeline::{self, Milestone};
use crate::vstate::memory::{create_guest_memory, map_memory_file};
use crate::vstate::vcpu::{Vcpu, VcpuStop};
use crate::vstate::vcpu_thread::VcpuHandle;
use crate::vstate::vm::Vm;

/// virtio-mmio QueueNotify register offset (virtio 1.2, 4.2.2).
const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

/// Smallest guest we boot.
pub const MIN_MEM_MIB: u64 = 32;
/// Largest guest we boot (1 TiB).
pub const MAX_MEM_MIB: u64 = 1 << 20;
/// Most vCPUs per guest.
pub const MAX_VCPUS: u8 = 32;
/// Most shared directories (virtio-fs devices) per guest; with vsock they
/// must fit in the IRQs left for virtio-mmio devices.
pub const MAX_SHARES: usize = 8;
/// Kernel command line every guest gets. It keeps boot work small: no
/// console chatter (each byte is a port I/O exit), no timer/TSC checks, no
/// rewriting of the ~5000 LOCK prefixes into UP form when there is one vCPU
/// (`noreplace-smp`: each is a text_poke through a temporary mm, about 1.5 s
/// of emulated kernel time on PVM hosts), and the RNG trusts the seed we
/// pass in `setup_data`. Every extra word costs too: the kernel parses the
/// whole line against all its parameters once per initcall level, so what
/// our kernel's config already settles (no PCI, no modules, no i8042, no
/// KASLR, no crypto self-tests) is not repeated here.
pub const BASE_CMDLINE: &str = "console=ttyS0 quiet reboot=k panic=1 tsc=reliable \
no_timer_check noreplace-smp random.trust_bootloader=on random.trust_cpu=on";

/// Errors of building a microVM. Each message is meant for the user.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Invalid configuration.
    #[error("{0}")]
    Config(String),
    /// The kernel image cannot be read.
    #[error("cannot open kernel {path}")]
    KernelOpen {
        /// Path given.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel image is not a loadable ELF vmlinux.
    #[error("kernel {path} is not an uncompressed x86_64 ELF vmlinux")]
    KernelLoad {
        /// Path given.
        path: PathBuf,
        /// Cause.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The initramfs cannot be read.
    #[error("cannot read initramfs {path}")]
    Initrd {
        /// Path given.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Kernel and initramfs do not fit in guest memory.
    #[error("guest memory of {mem_mib} MiB is too small for the kernel and initramfs")]
    TooLittleMemory {
        /// Configured memory.
        mem_mib: u64,
    },
    /// The serial output file cannot be created.
    #[error("cannot create serial output file {path}")]
    SerialOut {
        /// Path given.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// KVM VM set-up.
    #[error(transparent)]
    Vm(#[from] crate::vstate::vm::VmError),
    /// vCPU set-up.
    #[error(transparent)]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
    /// Guest memory allocation.
    #[error(transparent)]
    Memory(#[from] crate::vstate::memory::MemoryError),
    /// Boot parameters.
    #[error(transparent)]
    BootParams(#[from] boot_params::BootParamsError),
    /// Page tables and GDT.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// MP table.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// vsock device.
    #[error("vsock device")]
    Vsock(#[source] crate::devices::virtio::vsock::VsockError),
    /// virtio-fs device.
    #[error(transparent)]
    Fs(#[from] virtio_fs::FsError),
    /// virtio-net device.
    #[error(transparent)]
    Net(#[from] NetError),
    /// An eventfd, epoll or thread could not be created.
    #[error("{what}")]
    Os {
        /// Operation.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The event loop could not be set up.
    #[error("event loop: {0}")]
    EventManager(String),
    /// The API socket.
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
    /// Loading or applying a snapshot.
    #[error("cannot restore the snapshot")]
    Snapshot(#[source] SnapshotError),
}

impl From<SnapshotError> for BuildError {
    fn from(e: SnapshotError) -> Self {
        BuildError::Snapshot(e)
    }
}

fn os_err(what: &'static str) -> impl FnOnce(std::io::Error) -> BuildError {
    move |source| BuildError::Os { what, source }
}

/// vsock device settings.
#[derive(Clone, Debug)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub cid: u64,
    /// Host Unix socket for host-initiated connections.
    pub uds_path: PathBuf,
}

/// Everything needed to boot a microVM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Uncompressed ELF vmlinux.
    pub kernel: PathBuf,
    /// Optional initramfs (newc cpio).
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line, appended last (so it can override).
    pub extra_cmdline: String,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// vsock device, if any.
    pub vsock: Option<VsockConfig>,
    /// Shared directories, one virtio-fs device each.
    pub shares: Vec<ShareConfig>,
    /// Serial output file (stderr when `None`).
    pub serial_out: Option<PathBuf>,
    /// Host kind; detected when `None`.
    pub host_kind: Option<HostKind>,
    /// Control socket (see `crate::api`).
    pub api_sock: Option<PathBuf>,
    /// Add a virtio-balloon device with free page reporting.
    pub balloon: bool,
    /// Opt guest memory into KSM (see `memory::mark_mergeable`).
    pub ksm: bool,
    /// Network interfaces, one virtio-net device each (eth0, eth1, ...).
    pub nets: Vec<NetConfig>,
}

/// Everything needed to restore a microVM from a snapshot: the snapshot
/// and this instance's own host-side resources.
#[derive(Clone, Debug)]
pub struct RestoreConfig {
    /// Snapshot directory.
    pub dir: PathBuf,
    /// This instance's vsock CID and socket (required when the snapshot
    /// has a vsock device).
    pub vsock: Option<VsockConfig>,
    /// Serial output file (stderr when `None`).
    pub serial_out: Option<PathBuf>,
    /// Control socket.
    pub api_sock: Option<PathBuf>,
    /// Directories for the snapshot's virtio-fs devices, by tag: exactly
    /// the tags the snapshot has.
    pub shares: Vec<ShareConfig>,
    /// Opt guest memory into KSM (see `memory::mark_mergeable`).
    pub ksm: bool,
    /// Backends for the snapshot's virtio-net devices, in order: the i-th
    /// binds the i-th saved device; devices without one stay unbound
    /// (link down); more than the snapshot has is an error.
    pub nets: Vec<NetConfig>,
}

fn validate_vsock(v: &VsockConfig) -> Result<(), BuildError> {
    if v.cid < 3 || v.cid >= u64::from(u32::MAX) {
        return Err(BuildError::Config(format!(
            "vsock cid must be between 3 and {}, got {}",
            u32::MAX - 1,
            v.cid
        )));
    }
    if v.uds_path.exists() {
        return Err(BuildError::Config(format!(
            "vsock socket path {} already exists",
            v.uds_path.display()
        )));
    }
    Ok(())
}

fn open_serial_out(path: &Option<PathBuf>) -> Result<Box<dyn Write + Send>, BuildError> {
    Ok(match path {
        Some(path) => Box::new(File::create(path).map_err(|source| BuildError::SerialOut {
            path: path.clone(),
            source,
        })?),
        None => Box::new(std::io::stderr()),
    })
}

impl VmConfig {
    /// Checks the values before anything is created.
    pub fn validate(&self) -> Result<(), BuildError> {
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(BuildError::Config(format!(
                "guest memory must be between {MIN_MEM_MIB} and {MAX_MEM_MIB} MiB, got {}",
                self.mem_mib
            )));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(BuildError::Config(format!(
                "vcpus must be between 1 and {MAX_VCPUS}, got {}",
                self.vcpus
            )));
        }
        if let Some(v) = &self.vsock {
            validate_vsock(v)?;
        }
        if self.shares.len() > MAX_SHARES {
            return Err(BuildError::Config(format!(
                "at most {MAX_SHARES} shared directories, got {}",
                self.shares.len()
            )));
        }
        virtio_fs::validate_shares(&self.shares)?;
        if self.nets.len() > virtio_net::MAX_NETS {
            return Err(BuildError::Config(format!(
                "at most {} network interfaces, got {}",
                virtio_net::MAX_NETS,
                self.nets.len()
            )));
        }
        // The guest hot-adds each window as device memory and spends 64
        // bytes of its RAM per 4 KiB page of it (struct page): a window
        // larger than 8x the RAM would eat more than 1/8 of it, and the
        // device's probe fails when that allocation does.
        let total: u64 = self.shares.iter().filter_map(|s| s.dax_window).sum();
        if total > (self.mem_mib << 20).saturating_mul(MAX_DAX_PER_RAM) {
            return Err(BuildError::Config(format!(
                "DAX windows of {} MiB need more than 1/8 of the guest's {} MiB for page \
                 structures: at most {MAX_DAX_PER_RAM}x the guest memory",
                total >> 20,
                self.mem_mib
            )));
        }
        Ok(())
    }
}

/// DAX windows may add up to this many times the guest memory.
pub const MAX_DAX_PER_RAM: u64 = 8;

/// The full guest kernel command line for this configuration.
pub fn kernel_cmdline(host: HostKind, virtio_devices: &[(u64, u32)], extra: &str) -> String {
    let mut parts = vec![BASE_CMDLINE.to_string()];
    let host_part = host.kernel_cmdline();
    if !host_part.is_empty() {
        parts.push(host_part.to_string());
    }
    for (base, irq) in virtio_devices {
        parts.push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
    }
    let extra = extra.trim();
    if !extra.is_empty() {
        parts.push(extra.to_string());
    }
    parts.join(" ")
}

/// The guest's free page reporting order for a balloon in `mem_size` bytes
/// of RAM. Linux reports only while a zone has `32 << order` pages free
/// above its low watermark, and defaults `order` to `pageblock_order`,
/// which without huge pages is MAX_PAGE_ORDER (10): 128 MiB, so a guest of
/// 128 MiB never reported anything. We take the largest order up to 9
/// (2 MiB ranges) for which that reserve is at most half the guest's RAM.
pub fn page_reporting_order(mem_size: u64) -> u32 {
    let pages = mem_size / 4096;
    // 32 ranges per report, and half the RAM: pages / 64.
    let limit = (pages / 64).max(1);
    limit.ilog2().min(9)
}

/// Where the initramfs goes: page aligned, at the top of low RAM, above the kernel.
pub fn initrd_address(mem_size: u64, kernel_end: u64, initrd_size: u64) -> Option<u64> {
    let top = layout::low_ram_end(mem_size);
    let addr = top.checked_sub(initrd_size)? & !0xfff;
    (addr >= kernel_end).then_some(addr)
}

/// How the VM ended.
#[derive(Debug)]
pub enum VmOutcome {
    /// The guest rebooted or powered off.
    GuestReset,
    /// The guest triple-faulted.
    TripleFault,
    /// A vCPU hit a fatal error.
    VcpuError(crate::vstate::vcpu::VcpuError),
    /// The VMM got a termination signal.
    Signal(i32),
    /// The event loop failed.
    EventLoop(String),
}

impl VmOutcome {
    /// Process exit status for this outcome.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmOutcome::GuestReset => 0,
            VmOutcome::TripleFault => 2,
            VmOutcome::VcpuError(_) | VmOutcome::EventLoop(_) => 1,
            VmOutcome::Signal(sig) => 128 + sig,
        }
    }
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Wakes the event loop: a vCPU stopped, or a termination signal arrived.
struct StopWatcher {
    evt: Arc<EventFd>,
    stop: Arc<AtomicBool>,
}

impl MutEventSubscriber for StopWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.stop.store(true, Ordering::SeqCst);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&*self.evt, EventSet::IN)) {
            tracing::error!("cannot watch the stop eventfd: {e:?}");
        }
    }
}

/// Raw fd of the stop eventfd, for the async-signal-safe signal handler.
static STOP_FD: AtomicI32 = AtomicI32::new(-1);
/// Last termination signal received.
/// How often the RIP sampler interrupts each vCPU (see `profiler`).
const PROFILE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(1);

static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_term_signal(sig: libc::c_int) {
    STOP_SIGNAL.store(sig, Ordering::SeqCst);
    let fd = STOP_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; the buffer is a live u64.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

fn install_term_handlers(evt: &EventFd) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    STOP_FD.store(evt.as_raw_fd(), Ordering::SeqCst);
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is valid; we set a handler that only
        // touches atomics and calls write(2).
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_term_signal as *const () as usize;
        action.sa_flags = libc::SA_RESTART;
        // SAFETY: valid signal number and a fully initialised sigaction.
        if unsafe { libc::sigaction(sig, &action, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A virtio-mmio device of a running VM: where it sits, the device and its
/// transport (register window).
pub(crate) struct DeviceSlot<D> {
    pub(crate) base: u64,
    pub(crate) irq: u32,
    pub(crate) device: Arc<Mutex<D>>,
    pub(crate) transport: Arc<Mutex<MmioTransport>>,
}

/// The vsock device and where it sits.
pub(crate) type VsockSlot = DeviceSlot<Vsock>;
/// The balloon device of a running VM.
pub(crate) type BalloonSlot = DeviceSlot<Balloon>;
/// A virtio-net device of a running VM.
pub(crate) type NetSlot = DeviceSlot<Net>;

/// A virtio-fs device of a running VM.
pub(crate) struct FsSlot {
    pub(crate) slot: DeviceSlot<VirtioFs>,
    pub(crate) tag: String,
    /// The DAX window, kept for the life of the VM (KVM has it as a slot).
    pub(crate) dax: Option<Arc<DaxWindow>>,
}

/// What the generic attach path needs to know about a device type.
trait MmioDevice: VirtioDevice + Sized + 'static {
    /// Name for messages.
    const NAME: &'static str;
    /// The event-loop subscriber of the device, if it runs on the event
    /// loop (virtio-fs runs on threads of its own).
    fn subscriber(_device: &Arc<Mutex<Self>>) -> Option<Subscriber> {
        None
    }
}

impl MmioDevice for Vsock {
    const NAME: &'static str = "vsock";
    fn subscriber(device: &Arc<Mutex<Self>>) -> Option<Subscriber> {
        Some(device.clone())
    }
}

impl MmioDevice for Balloon {
    const NAME: &'static str = "balloon";
    fn subscriber(device: &Arc<Mutex<Self>>) -> Option<Subscriber> {
        Some(device.clone())
    }
}

impl MmioDevice for Net {
    const NAME: &'static str = "virtio-net";
    fn subscriber(device: &Arc<Mutex<Self>>) -> Option<Subscriber> {
        Some(device.clone())
    }
}

impl MmioDevice for VirtioFs {
    const NAME: &'static str = "virtio-fs";
}

/// Where a saved device sat and its transport registers.
#[derive(Clone, Copy)]
struct SavedSlot<'a> {
    base: u64,
    irq: u32,
    transport: &'a MmioTransportState,
}

/// What attaching a device touches: the VM, its memory, the MMIO bus and
/// the event loop.
struct Wiring<'a> {
    vm: &'a Vm,
    mem: &'a GuestMemoryMmap,
    bus: &'a mut DeviceBus,
    event_manager: &'a mut EventManager<Subscriber>,
}

/// MMIO base and IRQ of virtio slot `slot`.
fn slot_location(slot: usize) -> Result<(u64, u32), BuildError> {
    let irq = u32::try_from(slot)
        .ok()
        .and_then(|s| VIRTIO_IRQ_BASE.checked_add(s))
        .filter(|irq| *irq <= layout::MAX_IRQ)
        .ok_or_else(|| {
            BuildError::Config(format!(
                "too many devices: at most {} virtio devices",
                layout::MAX_IRQ - VIRTIO_IRQ_BASE + 1
            ))
        })?;
    Ok((VIRTIO_MMIO_BASE + slot as u64 * VIRTIO_MMIO_SIZE, irq))
}

impl Wiring<'_> {
    /// Attaches `device` in virtio slot `slot`, the one path for every
    /// virtio-mmio device: checks a saved device sat in the same slot,
    /// creates its interrupt (an irqfd), lets `restore` bring the device to
    /// its saved state with that interrupt, registers one ioeventfd per
    /// queue on QueueNotify, creates (or restores) the transport with
    /// `shm` as its shared memory regions, maps its window on the bus and
    /// subscribes the device to the event loop when it runs there.
    fn attach<D: MmioDevice>(
        &mut self,
        slot: usize,
        mut device: D,
        saved: Option<SavedSlot<'_>>,
        restore: impl FnOnce(&mut D, &Arc<Interrupt>) -> Result<(), String>,
        shm: Vec<ShmRegion>,
    ) -> Result<DeviceSlot<D>, BuildError> {
        let (base, irq) = slot_location(slot)?;
        if let Some(s) = saved {
            if (s.base, s.irq) != (base, irq) {
                return Err(SnapshotError::Mismatch(format!(
                    "{} device is not in the snapshot's slot {slot}",
                    D::NAME
                ))
                .into());
            }
        }
        for (i, evt) in device.queue_events().iter().enumerate() {
            self.vm
                .register_mmio_ioevent(evt, base + QUEUE_NOTIFY_OFFSET, i as u32)?;
        }
        let irq_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(os_err("eventfd"))?;
        self.vm.register_irqfd(&irq_evt, irq)?;
        let interrupt = Arc::new(Interrupt::new(irq_evt));
        if saved.is_some() {
            restore(&mut device, &interrupt)
                .map_err(|e| SnapshotError::Device(format!("{}: {e}", D::NAME)))?;
        }
        let device = Arc::new(Mutex::new(device));
        let dyn_device: Arc<Mutex<dyn VirtioDevice>> = device.clone();
        let mut transport = match saved {
            Some(s) => MmioTransport::restore(self.mem.clone(), dyn_device, interrupt, s.transport)
                .map_err(|e| SnapshotError::Device(format!("{} transport: {e}", D::NAME)))?,
            None => MmioTransport::new(self.mem.clone(), dyn_device, interrupt),
        };
        if !shm.is_empty() {
            transport.set_shm_regions(shm);
        }
        let transport = Arc::new(Mutex::new(transport));
        self.bus.add_mmio(base, transport.clone());
        if let Some(sub) = D::subscriber(&device) {
            self.event_manager.add_subscriber(sub);
        }
        Ok(DeviceSlot {
            base,
            irq,
            device,
            transport,
        })
    }
}

/// A built microVM, ready to run.
pub struct Microvm {
    pub(crate) vm: Vm,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) mem_mib: u64,
    pub(crate) host: HostKind,
    vcpus: Vec<Vcpu>,
    pub(crate) bus: Arc<DeviceBus>,
    event_manager: EventManager<Subscriber>,
    stop_evt: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    vsock_uds: Option<PathBuf>,
    pub(crate) vsock: Option<VsockSlot>,
    api: Option<ApiServer>,
    api_pending: Arc<AtomicBool>,
    /// Restored from a snapshot: reset vsock connections before running.
    restored: bool,
    /// virtio-fs devices. Their FUSE servers' state (open host inodes and
    /// handles) is not saved, so a snapshot is refused once the guest has
    /// used one; an unused device is saved and a clone binds its tag to a
    /// directory of its own.
    pub(crate) fs: Vec<FsSlot>,
    /// The balloon, if the VM has one.
    pub(crate) balloon: Option<BalloonSlot>,
    /// virtio-net devices, in slot order.
    pub(crate) nets: Vec<NetSlot>,
}

/// Creates the vsock device in virtio slot `slot`; restores its state
/// when `saved` is given.
fn add_vsock(
    w: &mut Wiring<'_>,
    vcfg: &VsockConfig,
    slot: usize,
    saved: Option<&VsockSlotState>,
) -> Result<VsockSlot, BuildError> {
    let mut vsock = Vsock::new(vcfg.cid, vcfg.uds_path.clone()).map_err(BuildError::Vsock)?;
    vsock.set_on_first_response(Box::new(|_port| timeline::mark(Milestone::AgentReady)));
    let mem = w.mem.clone();
    w.attach(
        slot,
        vsock,
        saved.map(|s| SavedSlot {
            base: s.base,
            irq: s.irq,
            transport: &s.transport,
        }),
        |v, interrupt| {
            let device = &saved.ok_or("no saved state")?.device;
            v.restore_state(device, mem, interrupt.clone())
                .map_err(|e| e.to_string())
        },
        Vec::new(),
    )
}

/// Creates a virtio-fs device for `share` in virtio slot `slot`, with its
/// DAX window at guest-physical `dax_addr` when the share has one; with
/// `saved`, restores the transport and (if the driver had activated it)
/// starts the FUSE server on the restored queues.
fn add_fs(
    w: &mut Wiring<'_>,
    share: &ShareConfig,
    slot: usize,
    dax_addr: Option<u64>,
    saved: Option<&FsSlotState>,
) -> Result<FsSlot, BuildError> {
    if let Some(s) = saved {
        if s.tag != share.tag {
            return Err(SnapshotError::Mismatch(format!(
                "virtio-fs device {:?} is not in the snapshot's slot {slot}",
                share.tag
            ))
            .into());
        }
    }
    let mut fs = VirtioFs::new(share)?;
    let dax = match (dax_addr, share.dax_window) {
        (Some(addr), Some(len)) => {
            let window = DaxWindow::new(addr, len).map_err(|source| FsError::DaxWindow {
                tag: share.tag.clone(),
                source,
            })?;
            let window = Arc::new(window);
            let kvm_slot = layout::DAX_FIRST_SLOT
                + u32::try_from(slot).map_err(|_| BuildError::Config("too many devices".into()))?;
            w.vm.register_dax_window(kvm_slot, &window)?;
            fs.set_dax_window(window.clone());
            Some(window)
        }
        _ => None,
    };
    // Shared memory region 0 is virtio-fs's "cache" (DAX window).
    let shm = dax
        .iter()
        .map(|w| ShmRegion {
            base: w.guest_addr(),
            len: w.len(),
        })
        .collect();
    let mem = w.mem.clone();
    let slot = w.attach(
        slot,
        fs,
        saved.map(|s| SavedSlot {
            base: s.base,
            irq: s.irq,
            transport: &s.transport,
        }),
        |fs, interrupt| {
            let transport = &saved.ok_or("no saved state")?.transport;
            let active = transport.status & crate::devices::virtio::mmio::status::DRIVER_OK != 0;
            let queues = if active {
                Some(
                    transport
                        .queues
                        .iter()
                        .map(|q| q.to_queue())
                        .collect::<Result<Vec<_>, String>>()?,
                )
            } else {
                None
            };
            fs.restore_state(transport.acked_features, queues, mem, interrupt.clone())
                .map_err(|e| e.to_string())
        },
        shm,
    )?;
    tracing::info!(
        tag = share.tag,
        dir = %share.dir.display(),
        read_only = share.read_only,
        base = slot.base,
        irq = slot.irq,
        dax_addr = dax.as_ref().map(|w| w.guest_addr()),
        dax_len = dax.as_ref().map(|w| w.len()),
        "virtio-fs device"
    );
    Ok(FsSlot {
        slot,
        tag: share.tag.clone(),
        dax,
    })
}

/// Opens the backend `backend` says.
fn open_backend(backend: &NetBackend) -> Result<Option<Tap>, NetError> {
    Ok(match backend {
        NetBackend::Tap(name) => Some(Tap::open_named(name)?),
        NetBackend::Fd(fd) => Some(Tap::from_fd(*fd)?),
        NetBackend::None => None,
    })
}

/// Creates a virtio-net device in virtio slot `slot` with the backend and
/// MAC of `net`; with `saved`, restores it (the MAC is the snapshot's
/// unless `net` gives one).
fn add_net(
    w: &mut Wiring<'_>,
    net: &NetConfig,
    slot: usize,
    saved: Option<&NetSlotState>,
) -> Result<NetSlot, BuildError> {
    let tap = open_backend(&net.backend)?;
    let mac = net
        .mac
        .or(saved.map(|s| s.device.mac))
        .unwrap_or_else(virtio_net::random_mac);
    let mut device = Net::new(mac, tap)?;
    if !net.offload {
        device = device.without_offloads();
    }
    let mem = w.mem.clone();
    let slot = w.attach(
        slot,
        device,
        saved.map(|s| SavedSlot {
            base: s.base,
            irq: s.irq,
            transport: &s.transport,
        }),
        |n, interrupt| {
            let device = &saved.ok_or("no saved state")?.device;
            n.restore_state(device, mem, interrupt.clone())
                .map_err(|e| e.to_string())
        },
        Vec::new(),
    )?;
    let (mac, tap) = match slot.device.lock() {
        Ok(d) => (
            virtio_net::format_mac(&d.mac()),
            d.tap_name().unwrap_or("none").to_string(),
        ),
        Err(_) => (String::new(), String::new()),
    };
    tracing::info!(
        base = slot.base,
        irq = slot.irq,
        mac,
        tap,
        "virtio-net device"
    );
    Ok(slot)
}

/// Creates the balloon in virtio slot `slot`; restores it with `saved`.
fn add_balloon(
    w: &mut Wiring<'_>,
    slot: usize,
    saved: Option<&BalloonSlotState>,
) -> Result<BalloonSlot, BuildError> {
    let balloon = Balloon::new().map_err(os_err("eventfd"))?;
    let mem = w.mem.clone();
    let slot = w.attach(
        slot,
        balloon,
        saved.map(|s| SavedSlot {
            base: s.base,
            irq: s.irq,
            transport: &s.transport,
        }),
        |b, interrupt| {
            let device = &saved.ok_or("no saved state")?.device;
            b.restore_state(device, mem, interrupt.clone())
                .map_err(|e| e.to_string())
        },
        Vec::new(),
    )?;
    tracing::info!(
        base = slot.base,
        irq = slot.irq,
        "virtio-balloon device (free page reporting)"
    );
    Ok(slot)
}

/// The parts every microVM gets after its devices: the stop watcher,
/// signal handlers and the API socket.
struct Control {
    stop_evt: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    api: Option<ApiServer>,
    api_pending: Arc<AtomicBool>,
}

fn add_control(
    event_manager: &mut EventManager<Subscriber>,
    api_sock: &Option<PathBuf>,
) -> Result<Control, BuildError> {
    let stop_evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(os_err("eventfd"))?);
    let stop = Arc::new(AtomicBool::new(false));
    let watcher: Subscriber = Arc::new(Mutex::new(StopWatcher {
        evt: stop_evt.clone(),
        stop: stop.clone(),
    }));
    event_manager.add_subscriber(watcher);
    install_term_handlers(&stop_evt).map_err(os_err("sigaction"))?;
    let api_pending = Arc::new(AtomicBool::new(false));
    let api = match api_sock {
        Some(path) => {
            let server = ApiServer::bind(path)?;
            let watcher: Subscriber = Arc::new(Mutex::new(StopWatcher {
                evt: server.wake_evt(),
                stop: api_pending.clone(),
            }));
            event_manager.add_subscriber(watcher);
            Some(server)
        }
        None => None,
    };
    Ok(Control {
        stop_evt,
        stop,
        api,
        api_pending,
    })
}

/// Builds a microVM from `cfg`.
pub fn build_microvm(cfg: &VmConfig) -> Result<Microvm, BuildError> {
    cfg.validate()?;
    let host = cfg.host_kind.unwrap_or_else(HostKind::detect);
    tracing::info!(?host, "host kind");
    let mem_size = cfg.mem_mib << 20;

    // Open inputs first so bad paths fail before any resource is created.
    let mut kernel = File::open(&cfg.kernel).map_err(|source| BuildError::KernelOpen {
        path: cfg.kernel.clone(),
        source,
    })?;
    let initrd_bytes = match &cfg.initrd {
        Some(path) => Some(std::fs::read(path).map_err(|source| BuildError::Initrd {
            path: path.clone(),
            source,
        })?),
        None => None,
    };
    let serial_out = open_serial_out(&cfg.serial_out)?;

    let vm = Vm::new()?;
    let mem = create_guest_memory(mem_size)?;
    if cfg.ksm {
        crate::vstate::memory::mark_mergeable(&mem).map_err(os_err("madvise(MADV_MERGEABLE)"))?;
    }
    vm.register_memory(&mem)?;

    let loaded =
        Elf::load(&mem, None, &mut kernel, Some(GuestAddress(HIMEM_START))).map_err(|source| {
            BuildError::KernelLoad {
                path: cfg.kernel.clone(),
                source,
            }
        })?;
    let entry = loaded.kernel_load.0;
    let kernel_end = loaded.kernel_end;
    if kernel_end >= layout::low_ram_end(mem_size) {
        return Err(BuildError::TooLittleMemory {
            mem_mib: cfg.mem_mib,
        });
    }
    let initrd = match &initrd_bytes {
        Some(bytes) => {
            let size = bytes.len() as u64;
            let addr =
                initrd_address(mem_size, kernel_end, size).ok_or(BuildError::TooLittleMemory {
                    mem_mib: cfg.mem_mib,
                })?;
            mem.write_slice(bytes, GuestAddress(addr)).map_err(|e| {
                BuildError::BootParams(boot_params::BootParamsError::GuestMemory(e))
            })?;
            Some(InitrdLocation {
                addr,
                size: u32::try_from(size).map_err(|_| BuildError::TooLittleMemory {
                    mem_mib: cfg.mem_mib,
                })?,
            })
        }
        None => None,
    };
    // Leave the guest at least 16 MiB to run in besides kernel and initramfs.
    let used = kernel_end + initrd.map_or(0, |i| u64::from(i.size));
    if used + (16 << 20) > mem_size {
        return Err(BuildError::TooLittleMemory {
            mem_mib: cfg.mem_mib,
        });
    }

    // Devices.
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(os_err("eventfd"))?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ)?;
    let serial = SerialDevice::new(serial_irq, serial_out);
    let mut bus = DeviceBus::new(serial);
    let mut event_manager: EventManager<Subscriber> =
        EventManager::new().map_err(|e| BuildError::EventManager(format!("{e:?}")))?;
    let mut virtio_slots = Vec::new();

    let mut w = Wiring {
        vm: &vm,
        mem: &mem,
        bus: &mut bus,
        event_manager: &mut event_manager,
    };
    let mut vsock_slot = None;
    if let Some(vcfg) = &cfg.vsock {
        let slot = add_vsock(&mut w, vcfg, virtio_slots.len(), None)?;
        virtio_slots.push((slot.base, slot.irq));
        vsock_slot = Some(slot);
    }

    // virtio-fs: each device runs its FUSE server on a thread of its own
    // (started when the guest activates it), not on the event loop.
    let mut fs_slots = Vec::with_capacity(cfg.shares.len());
    let dax_sizes: Vec<Option<u64>> = cfg.shares.iter().map(|s| s.dax_window).collect();
    let dax_addrs = layout::dax_window_addresses(mem_size, &dax_sizes);
    for (share, dax_addr) in cfg.shares.iter().zip(dax_addrs) {
        let slot = add_fs(&mut w, share, virtio_slots.len(), dax_addr, None)?;
        virtio_slots.push((slot.slot.base, slot.slot.irq));
        fs_slots.push(slot);
    }
    // virtio-net: after the shares, before the balloon.
    let mut nets = Vec::with_capacity(cfg.nets.len());
    for net in &cfg.nets {
        let slot = add_net(&mut w, net, virtio_slots.len(), None)?;
        virtio_slots.push((slot.base, slot.irq));
        nets.push(slot);
    }
    let balloon = if cfg.balloon {
        let slot = add_balloon(&mut w, virtio_slots.len(), None)?;
        virtio_slots.push((slot.base, slot.irq));
        Some(slot)
    } else {
        None
    };

    let control = add_control(&mut event_manager, &cfg.api_sock)?;

    // Boot structures.
    let mut extra = cfg.extra_cmdline.clone();
    if balloon.is_some() {
        extra = format!(
            "page_reporting.page_reporting_order={} {extra}",
            page_reporting_order(mem_size)
        );
    }
    let cmdline = kernel_cmdline(host, &virtio_slots, &extra);
    tracing::info!(%cmdline, "kernel command line");
    let seed = boot_params::host_rng_seed().map_err(os_err("getrandom"))?;
    boot_params::write_boot_data(&mem, mem_size, &cmdline, initrd, seed)?;
    regs::write_boot_structures(&mem)?;
    mptable::setup_mptable(&mem, cfg.vcpus)?;

    let bus = Arc::new(bus);
    let cpuid = vm.supported_cpuid()?;
    let mut vcpus = Vec::with_capacity(usize::from(cfg.vcpus));
    for id in 0..cfg.vcpus {
        let vcpu = Vcpu::new(id, vm.create_vcpu(id)?, bus.clone());
        vcpu.configure(&cpuid, cfg.vcpus, (id == 0).then_some(entry))?;
        vcpus.push(vcpu);
    }
    timeline::mark(Milestone::VmSetupDone);
    Ok(Microvm {
        vm,
        mem,
        mem_mib: cfg.mem_mib,
        host,
        vcpus,
        bus,
        event_manager,
        stop_evt: control.stop_evt,
        stop: control.stop,
        vsock_uds: cfg.vsock.as_ref().map(|v| v.uds_path.clone()),
        vsock: vsock_slot,
        api: control.api,
        api_pending: control.api_pending,
        restored: false,
        fs: fs_slots,
        balloon,
        nets,
    })
}

/// Restores a microVM from the snapshot in `cfg.dir`: the same steps as a
/// boot, with saved state instead of a kernel. Order: memory (mapped
/// privately from the memory file), irqchip/PIT/clock, devices, vCPUs.
/// The vsock transport reset is sent when the VM starts running.
pub fn restore_microvm(cfg: &RestoreConfig) -> Result<Microvm, BuildError> {
    if let Some(v) = &cfg.vsock {
        validate_vsock(v)?;
    }
    let state: MicrovmState = snapshot::load_state(&cfg.dir)?;
    let host = HostKind::detect();
    tracing::info!(?host, saved_on = %state.host_kind, "restoring snapshot");
    if state.vsock.is_some() && cfg.vsock.is_none() {
        return Err(BuildError::Config(
            "the snapshot has a vsock device: --vsock-uds is required".into(),
        ));
    }
    let serial_out = open_serial_out(&cfg.serial_out)?;
    let (_, mem_path) = snapshot::paths(&cfg.dir);
    let mem = map_memory_file(&mem_path, &state.memory).map_err(SnapshotError::from)?;
    if cfg.ksm {
        crate::vstate::memory::mark_mergeable(&mem).map_err(os_err("madvise(MADV_MERGEABLE)"))?;
    }

    let vm = Vm::new()?;
    vm.register_memory(&mem)?;
    vm.restore_state(&state.vm).map_err(SnapshotError::from)?;

    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(os_err("eventfd"))?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ)?;
    let serial = SerialDevice::from_state(&state.serial, serial_irq, serial_out)
        .map_err(SnapshotError::Device)?;
    let mut bus = DeviceBus::new(serial);
    let mut event_manager: EventManager<Subscriber> =
        EventManager::new().map_err(|e| BuildError::EventManager(format!("{e:?}")))?;
    let mut w = Wiring {
        vm: &vm,
        mem: &mem,
        bus: &mut bus,
        event_manager: &mut event_manager,
    };
    let mut vsock_slot = None;
    if let (Some(saved), Some(vcfg)) = (&state.vsock, &cfg.vsock) {
        vsock_slot = Some(add_vsock(&mut w, vcfg, 0, Some(saved))?);
    }
    virtio_fs::validate_shares(&cfg.shares)?;
    let mut saved_tags: Vec<&str> = state.fs.iter().map(|f| f.tag.as_str()).collect();
    let mut given_tags: Vec<&str> = cfg.shares.iter().map(|s| s.tag.as_str()).collect();
    saved_tags.sort_unstable();
    given_tags.sort_unstable();
    if saved_tags != given_tags {
        return Err(BuildError::Config(format!(
            "the snapshot has virtio-fs tags {saved_tags:?}: give each a directory with --fs TAG=DIR (got {given_tags:?})"
        )));
    }
    let first_fs_slot = usize::from(state.vsock.is_some());
    let mut fs_slots = Vec::with_capacity(state.fs.len());
    for (i, saved) in state.fs.iter().enumerate() {
        let share = cfg
            .shares
            .iter()
            .find(|s| s.tag == saved.tag)
            .ok_or_else(|| BuildError::Config(format!("no directory for tag {:?}", saved.tag)))?;
        // The window is the snapshot's: the guest knows where it is.
        if let Some(w) = saved.dax_window {
            if w.guest_addr < layout::dax_windows_start(state.mem_mib << 20)
                || !w.guest_addr.is_multiple_of(layout::DAX_WINDOW_ALIGN)
            {
                return Err(SnapshotError::Mismatch(format!(
                    "DAX window of {:?} at {:#x} overlaps RAM or is misaligned",
                    saved.tag, w.guest_addr
                ))
                .into());
            }
        }
        let saved_len = saved.dax_window.map(|w| w.len);
        if share.dax_window.is_some() && share.dax_window != saved_len {
            return Err(BuildError::Config(format!(
                "share {:?}: the snapshot's DAX window is {saved_len:?} bytes, not {:?}",
                share.tag, share.dax_window
            )));
        }
        let share = ShareConfig {
            dax_window: saved_len,
            ..share.clone()
        };
        fs_slots.push(add_fs(
            &mut w,
            &share,
            first_fs_slot + i,
            saved.dax_window.map(|w| w.guest_addr),
            Some(saved),
        )?);
    }
    if cfg.nets.len() > state.nets.len() {
        return Err(BuildError::Config(format!(
            "the snapshot has {} network interfaces, {} --net given",
            state.nets.len(),
            cfg.nets.len()
        )));
    }
    let first_net_slot = first_fs_slot + state.fs.len();
    let mut nets = Vec::with_capacity(state.nets.len());
    let unbound = NetConfig {
        backend: NetBackend::None,
        mac: None,
        offload: true,
    };
    for (i, saved) in state.nets.iter().enumerate() {
        let net = cfg.nets.get(i).unwrap_or(&unbound);
        nets.push(add_net(&mut w, net, first_net_slot + i, Some(saved))?);
    }
    let balloon = match &state.balloon {
        Some(saved) => Some(add_balloon(
            &mut w,
            first_net_slot + state.nets.len(),
            Some(saved),
        )?),
        None => None,
    };
    let control = add_control(&mut event_manager, &cfg.api_sock)?;

    let bus = Arc::new(bus);
    let count = u8::try_from(state.vcpus.len())
        .map_err(|_| SnapshotError::Mismatch("too many vCPUs".into()))?;
    let mut vcpus = Vec::with_capacity(usize::from(count));
    for saved in &state.vcpus {
        let vcpu = Vcpu::new(saved.id, vm.create_vcpu(saved.id)?, bus.clone());
        vcpu.restore_state(saved).map_err(SnapshotError::from)?;
        vcpus.push(vcpu);
    }
    timeline::mark(Milestone::VmSetupDone);
    Ok(Microvm {
        vm,
        mem,
        mem_mib: state.mem_mib,
        host,
        vcpus,
        bus,
        event_manager,
        stop_evt: control.stop_evt,
        stop: control.stop,
        vsock_uds: cfg.vsock.as_ref().map(|v| v.uds_path.clone()),
        vsock: vsock_slot,
        api: control.api,
        api_pending: control.api_pending,
        restored: true,
        fs: fs_slots,
        balloon,
        nets,
    })
}

impl Microvm {
    /// Runs the guest until it resets, a vCPU fails, or a signal arrives.
    /// vCPU threads that are still running when this returns end with the
    /// process.
    pub fn run(mut self) -> VmOutcome {
        if self.restored {
            if let Some(slot) = &self.vsock {
                if let Ok(mut v) = slot.device.lock() {
                    v.reset_connections_and_send_transport_reset();
                }
            }
            for slot in &self.nets {
                if let Ok(mut n) = slot.device.lock() {
                    n.announce_link_change();
                }
            }
        }
        let (tx, rx) = mpsc::channel::<VcpuStop>();
        let mut handles = Vec::with_capacity(self.vcpus.len());
        for vcpu in std::mem::take(&mut self.vcpus) {
            match VcpuHandle::spawn(
                vcpu,
                tx.clone(),
                self.stop_evt.clone(),
                false,
                self.host.vcpu_slice(),
            ) {
                Ok(h) => handles.push(h),
                Err(e) => {
                    return VmOutcome::EventLoop(format!("cannot start a vCPU thread: {e}"));
                }
            }
        }
        drop(tx);
        // Declared after `handles`, so dropped (stopped and joined) before them.
        let _sampler = if crate::profiler::enabled() {
            match crate::profiler::Kicker::start(
                &handles.iter().map(VcpuHandle::pthread).collect::<Vec<_>>(),
                PROFILE_INTERVAL,
            ) {
                Ok(k) => Some(k),
                Err(e) => return VmOutcome::EventLoop(format!("cannot start the sampler: {e}")),
            }
        } else {
            None
        };
        let mut paused = false;
        let outcome = loop {
            if let Err(e) = self.event_manager.run() {
                break VmOutcome::EventLoop(format!("{e:?}"));
            }
            if self.api_pending.swap(false, Ordering::SeqCst) {
                self.serve_api(&handles, &mut paused);
            }
            if !self.stop.load(Ordering::SeqCst) {
                continue;
            }
            self.stop.store(false, Ordering::SeqCst);
            if let Ok(stop) = rx.try_recv() {
                break match stop {
                    VcpuStop::GuestReset => VmOutcome::GuestReset,
                    VcpuStop::TripleFault => VmOutcome::TripleFault,
                    VcpuStop::Error(e) => VmOutcome::VcpuError(e),
                };
            }
            let sig = STOP_SIGNAL.swap(0, Ordering::SeqCst);
            if sig != 0 {
                break VmOutcome::Signal(sig);
            }
        };
        self.bus.flush_serial();
        self.cleanup();
        outcome
    }

    /// Answers every waiting API request (on the event-loop thread).
    fn serve_api(&mut self, handles: &[VcpuHandle], paused: &mut bool) {
        use crate::api::ApiRequest;
        while let Some(p) = self.api.as_ref().and_then(ApiServer::next_request) {
            let answer = match &p.request {
                ApiRequest::Status => Ok(if *paused { "paused" } else { "running" }.to_string()),
                ApiRequest::Pause => self.pause_all(handles, paused).map(|()| "paused".into()),
                ApiRequest::Resume => {
                    Self::resume_all(handles, paused);
                    Ok("running".into())
                }
                ApiRequest::Snapshot(dir) => {
                    let was_paused = *paused;
                    let t = std::time::Instant::now();
                    let r = self
                        .pause_all(handles, paused)
                        .and_then(|()| self.save_snapshot(handles, dir));
                    if !was_paused {
                        Self::resume_all(handles, paused);
                    }
                    match &r {
                        Ok(()) => {
                            tracing::info!(dir = %dir.display(), ms = t.elapsed().as_millis() as u64, "snapshot written")
                        }
                        Err(e) => tracing::error!("snapshot failed: {e}"),
                    }
                    r.map(|()| format!("snapshot {}", dir.display()))
                }
            };
            let answer = answer.map_err(|e| error_chain(&e));
            let _ = p.reply.send(answer);
        }
    }

    fn pause_all(&self, handles: &[VcpuHandle], paused: &mut bool) -> Result<(), SnapshotError> {
        if *paused {
            return Ok(());
        }
        for (i, h) in handles.iter().enumerate() {
            if let Err(e) = h.pause() {
                // Do not leave some vCPUs paused and others running.
                for h in &handles[..i] {
                    h.resume();
                }
                return Err(e.into());
            }
        }
        *paused = true;
        Ok(())
    }

    fn resume_all(handles: &[VcpuHandle], paused: &mut bool) {
        if !*paused {
            return;
        }
        for h in handles {
            h.resume();
        }
        *paused = false;
    }

    /// Removes host resources that outlive the process (the vsock and
    /// API sockets).
    fn cleanup(&mut self) {
        for slot in &self.nets {
            if let Ok(n) = slot.device.lock() {
                n.log_stats();
            }
        }
        if let Some(path) = &self.vsock_uds {
            let _ = std::fs::remove_file(path);
        }
        self.api = None;
    }
}

/// An error and its sources on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> VmConfig {
        VmConfig {
            kernel: PathBuf::from("/nonexistent"),
            initrd: None,
            extra_cmdline: String::new(),
            mem_mib: 128,
            vcpus: 1,
            vsock: None,
            shares: Vec::new(),
            serial_out: None,
            host_kind: Some(HostKind::Hardware),
            api_sock: None,
            balloon: false,
            ksm: false,
            nets: Vec::new(),
        }
    }

    #[test]
    fn validation() {
        assert!(cfg().validate().is_ok());
        let mut c = cfg();
        c.mem_mib = 8;
        assert!(c.validate().unwrap_err().to_string().contains("between 32"));
        let mut c = cfg();
        c.vcpus = 0;
        assert!(c.validate().is_err());
        let mut c = cfg();
        c.vsock = Some(VsockConfig {
            cid: 2,
            uds_path: PathBuf::from("/tmp/x"),
        });
        assert!(c.validate().is_err());
        let dir = std::env::temp_dir();
        let mut c = cfg();
        c.vsock = Some(VsockConfig {
            cid: 3,
            uds_path: dir,
        });
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("already exists"));
        let share = |dax| ShareConfig {
            tag: "t".into(),
            dir: std::env::temp_dir(),
            read_only: false,
            dax_window: Some(dax),
        };
        let mut c = cfg();
        c.shares = vec![share(1 << 30)];
        assert!(c.validate().is_ok());
        c.shares = vec![share((1 << 30) + (2 << 20))];
        assert!(c.validate().unwrap_err().to_string().contains("DAX"));
    }

    #[test]
    fn page_reporting_order_fits_small_guests() {
        assert_eq!(page_reporting_order(64 << 20), 8);
        assert_eq!(page_reporting_order(128 << 20), 9);
        assert_eq!(page_reporting_order(4 << 30), 9);
        assert_eq!(page_reporting_order(1 << 20), 2);
        for mib in [16u64, 64, 128, 256] {
            let reserve = 32u64 << page_reporting_order(mib << 20);
            assert!(reserve * 4096 <= (mib << 20) / 2, "{mib} MiB");
        }
    }

    #[test]
    fn cmdline_composition() {
        let c = kernel_cmdline(HostKind::Hardware, &[(0xd000_0000, 5)], " loglevel=7 ");
        assert!(c.starts_with(BASE_CMDLINE));
        assert!(c.contains("virtio_mmio.device=4K@0xd0000000:5"));
        assert!(c.ends_with("loglevel=7"));
        assert!(!c.contains("clearcpuid"));
        let p = kernel_cmdline(HostKind::Pvm, &[], "");
        assert!(p.contains("clearcpuid=") && p.contains("nopti"));
    }

    #[test]
    fn initrd_placement() {
        let mem = 128u64 << 20;
        let a = initrd_address(mem, 32 << 20, 1_000_001).unwrap();
        assert_eq!(a % 4096, 0);
        assert!(a + 1_000_001 <= mem);
        assert!(initrd_address(mem, 120 << 20, 16 << 20).is_none());
        assert!(initrd_address(mem, 0, mem + 1).is_none());
    }
}
