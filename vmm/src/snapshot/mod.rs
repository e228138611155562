//! Snapshots: what is saved, and where.
//!
//! A snapshot is a directory with two files:
//! - `vmstate`: the [`MicrovmState`] in the container of [`file`] (format
//!   version, build id, SHA-256);
//! - `memory`: guest RAM, region after region, sparse where the guest
//!   memory is zero. A restored VM maps it privately (copy-on-write).
//!
//! `vmstate` is written last (atomically), so a directory that has it is
//! complete. See `vmm/SNAPSHOT.md`.

pub mod file;
mod save;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::devices::serial::SerialSnapshot;
use crate::devices::virtio::mmio::MmioTransportState;
use crate::devices::virtio::vsock::device::VsockState;
use crate::vstate::memory::MemoryRegionState;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm::VmState;

/// Name of the state file in a snapshot directory.
pub const STATE_FILE: &str = "vmstate";
/// Name of the memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

/// The vsock device slot: where it sits, the transport and the device.
#[derive(Debug, Serialize, Deserialize)]
pub struct VsockSlotState {
    /// MMIO window base.
    pub base: u64,
    /// Interrupt line.
    pub irq: u32,
    /// virtio-mmio registers.
    pub transport: MmioTransportState,
    /// Device state.
    pub device: VsockState,
}

/// A virtio-fs device slot: where it sits, its tag and the transport. The
/// FUSE server has no state to save: only devices the guest never used
/// are saved (a clone serves its own directory under the same tag).
#[derive(Debug, Serialize, Deserialize)]
pub struct FsSlotState {
    /// MMIO window base.
    pub base: u64,
    /// Interrupt line.
    pub irq: u32,
    /// The share's tag (what the guest sees in config space).
    pub tag: String,
    /// virtio-mmio registers and queue addresses.
    pub transport: MmioTransportState,
    /// The device's DAX window. The guest learnt its place and size when
    /// it probed the device, so a restore recreates it exactly there
    /// (empty: a snapshot is refused once the guest used the device, and
    /// mappings only exist after it did).
    #[serde(default)]
    pub dax_window: Option<DaxWindowState>,
}

/// Where a DAX window is in guest-physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaxWindowState {
    /// Guest-physical base.
    pub guest_addr: u64,
    /// Length in bytes.
    pub len: u64,
}

/// The balloon slot: where it sits, the transport and the device.
#[derive(Debug, Serialize, Deserialize)]
pub struct BalloonSlotState {
    /// MMIO window base.
    pub base: u64,
    /// Interrupt line.
    pub irq: u32,
    /// virtio-mmio registers.
    pub transport: MmioTransportState,
    /// Device state.
    pub device: crate::devices::virtio::balloon::BalloonState,
}

/// A virtio-net device slot: where it sits, the transport and the device.
/// The backend (tap) is host state and not saved: a VM saved with a bound
/// tap is saved as it is (its link state recorded), and a restore binds
/// whatever its `--net` says, telling the guest if the link changed.
#[derive(Debug, Serialize, Deserialize)]
pub struct NetSlotState {
    /// MMIO window base.
    pub base: u64,
    /// Interrupt line.
    pub irq: u32,
    /// virtio-mmio registers.
    pub transport: MmioTransportState,
    /// Device state.
    pub device: crate::devices::virtio::net::NetState,
}

/// Everything a restore needs besides guest memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct MicrovmState {
    /// Guest memory size.
    pub mem_mib: u64,
    /// Guest RAM regions and where they are in the memory file.
    pub memory: Vec<MemoryRegionState>,
    /// Host kind the snapshot was taken on (informational: the guest
    /// kernel command line was chosen for it).
    pub host_kind: String,
    /// irqchip, PIT, clock.
    pub vm: VmState,
    /// One entry per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// COM1.
    pub serial: SerialSnapshot,
    /// The vsock device, if the VM had one.
    pub vsock: Option<VsockSlotState>,
    /// virtio-fs devices, in slot order after vsock.
    #[serde(default)]
    pub fs: Vec<FsSlotState>,
    /// The balloon, in the slot after the virtio-net devices.
    #[serde(default)]
    pub balloon: Option<BalloonSlotState>,
    /// virtio-net devices, in slot order after the virtio-fs devices.
    #[serde(default)]
    pub nets: Vec<NetSlotState>,
}

/// Errors of taking or loading a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The snapshot directory is missing or not a directory.
    #[error("snapshot directory {0} does not exist")]
    NoDir(PathBuf),
    /// The directory could not be created.
    #[error("cannot create snapshot directory {path}")]
    CreateDir {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The state file.
    #[error(transparent)]
    StateFile(#[from] file::StateFileError),
    /// The memory file.
    #[error(transparent)]
    Memory(#[from] crate::vstate::memory::MemoryFileError),
    /// A vCPU.
    #[error(transparent)]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
    /// The VM.
    #[error(transparent)]
    Vm(#[from] crate::vstate::vm::VmError),
    /// The saved state does not fit this VMM's machine model.
    #[error("snapshot does not fit: {0}")]
    Mismatch(String),
    /// A device could not be saved or restored.
    #[error("device state: {0}")]
    Device(String),
}

/// Paths of the two files of snapshot `dir`.
pub fn paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join(STATE_FILE), dir.join(MEMORY_FILE))
}

/// Loads and checks the state of snapshot `dir`.
pub fn load_state(dir: &Path) -> Result<MicrovmState, SnapshotError> {
    if !dir.is_dir() {
        return Err(SnapshotError::NoDir(dir.to_path_buf()));
    }
    let (state_path, _) = paths(dir);
    let state: MicrovmState = file::read(&state_path)?;
    state.check()?;
    Ok(state)
}

/// Checks that snapshot `dir` can be restored, without KVM: its state
/// (see [`load_state`]) and that its memory file has the size the state
/// describes.
pub fn check_dir(dir: &Path) -> Result<(), SnapshotError> {
    let state = load_state(dir)?;
    let (_, mem) = paths(dir);
    let len = std::fs::metadata(&mem)
        .map_err(|e| SnapshotError::Mismatch(format!("memory file {}: {e}", mem.display())))?
        .len();
    if len != state.mem_mib << 20 {
        return Err(SnapshotError::Mismatch(format!(
            "memory file has {len} bytes, the state describes {} MiB",
            state.mem_mib
        )));
    }
    Ok(())
}

impl MicrovmState {
    /// Consistency checks that do not need KVM.
    pub fn check(&self) -> Result<(), SnapshotError> {
        let n = self.vcpus.len();
        if n == 0 || n > usize::from(crate::builder::MAX_VCPUS) {
            return Err(SnapshotError::Mismatch(format!("{n} vCPUs")));
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            if usize::from(v.id) != i {
                return Err(SnapshotError::Mismatch("vCPU ids out of order".into()));
            }
        }
        let total: u64 = self.memory.iter().map(|r| r.size).sum();
        if total != self.mem_mib << 20 {
            return Err(SnapshotError::Mismatch(format!(
                "memory regions add up to {total} bytes, not {} MiB",
                self.mem_mib
            )));
        }
        Ok(())
    }
}
