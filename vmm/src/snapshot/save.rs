//! Taking a snapshot of a running microVM (its vCPUs paused by the caller).

use std::path::Path;

use kvm_ioctls::Cap;

use super::{file, paths, MicrovmState, SnapshotError, VsockSlotState};
use crate::builder::Microvm;
use crate::vstate::memory::save_memory;
use crate::vstate::vcpu_state::SaveCaps;
use crate::vstate::vcpu_thread::VcpuHandle;

impl Microvm {
    /// Saves vCPUs, VM, devices and memory into `dir` (created if needed).
    /// Every vCPU must be paused; the event loop is this thread, so the
    /// devices are quiescent too. The memory file is written first and the
    /// state file last, atomically.
    pub(crate) fn save_snapshot(
        &self,
        handles: &[VcpuHandle],
        dir: &Path,
    ) -> Result<(), SnapshotError> {
        if self.fs_devices > 0 {
            return Err(SnapshotError::Device(format!(
                "cannot snapshot a VM with {} virtio-fs device(s): their FUSE server state \
                 (open host inodes and handles) is not saved; take templates before shares are added",
                self.fs_devices
            )));
        }
        std::fs::create_dir_all(dir).map_err(|source| SnapshotError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let caps = SaveCaps {
            msr_list: self.vm.msr_index_list()?,
            xsave: self.vm.has_cap(Cap::Xsave),
            xcrs: self.vm.has_cap(Cap::Xcrs),
        };
        let vcpus = handles
            .iter()
            .map(|h| h.save(&caps))
            .collect::<Result<Vec<_>, _>>()?;
        let vm = self.vm.save_state()?;
        let serial = self
            .bus
            .serial_state()
            .ok_or_else(|| SnapshotError::Device("serial device lock poisoned".into()))?;
        let vsock = match &self.vsock {
            Some(slot) => {
                let transport = slot
                    .transport
                    .lock()
                    .map_err(|_| SnapshotError::Device("vsock transport lock poisoned".into()))?
                    .save_state();
                let device = slot
                    .device
                    .lock()
                    .map_err(|_| SnapshotError::Device("vsock lock poisoned".into()))?
                    .save_state();
                Some(VsockSlotState {
                    base: slot.base,
                    irq: slot.irq,
                    transport,
                    device,
                })
            }
            None => None,
        };
        let (state_path, mem_path) = paths(dir);
        // A stale state file must not pair with the new memory file.
        let _ = std::fs::remove_file(&state_path);
        let memory = save_memory(&self.mem, &mem_path)?;
        let state = MicrovmState {
            mem_mib: self.mem_mib,
            memory,
            host_kind: format!("{:?}", self.host),
            vm,
            vcpus,
            serial,
            vsock,
        };
        file::write(&state_path, &state)?;
        Ok(())
    }
}
