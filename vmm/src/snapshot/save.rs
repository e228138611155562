//! Taking a snapshot of a running microVM (its vCPUs paused by the caller).

use std::path::Path;

use kvm_ioctls::Cap;

use vm_memory::{Bytes, GuestAddress};

use super::{
    file, paths, BalloonSlotState, DaxWindowState, FsSlotState, MicrovmState, NetSlotState,
    SnapshotError, VsockSlotState,
};
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
        let mut fs = Vec::with_capacity(self.fs.len());
        for fs_slot in &self.fs {
            let slot = &fs_slot.slot;
            let used = slot
                .device
                .lock()
                .map_err(|_| SnapshotError::Device("virtio-fs lock poisoned".into()))?
                .used();
            let transport = slot
                .transport
                .lock()
                .map_err(|_| SnapshotError::Device("virtio-fs transport lock poisoned".into()))?
                .save_state();
            // The guest may have posted a request the server has not taken
            // yet: the avail index in guest memory says whether it ever did.
            let posted = transport.queues.iter().any(|q| {
                q.ready
                    && self
                        .mem
                        .read_obj::<u16>(GuestAddress(q.avail_ring.wrapping_add(2)))
                        .map_or(true, |idx| idx != 0)
            });
            if used || posted {
                return Err(SnapshotError::Device(format!(
                    "virtio-fs share {:?} is in use by the guest: the FUSE server's state \
                     (open host inodes and handles) cannot be saved; snapshot before mounting",
                    fs_slot.tag
                )));
            }
            fs.push(FsSlotState {
                base: slot.base,
                irq: slot.irq,
                tag: fs_slot.tag.clone(),
                transport,
                dax_window: fs_slot.dax.as_ref().map(|w| DaxWindowState {
                    guest_addr: w.guest_addr(),
                    len: w.len(),
                }),
            });
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
        let balloon = match &self.balloon {
            Some(slot) => Some(BalloonSlotState {
                base: slot.base,
                irq: slot.irq,
                transport: slot
                    .transport
                    .lock()
                    .map_err(|_| SnapshotError::Device("balloon transport lock poisoned".into()))?
                    .save_state(),
                device: slot
                    .device
                    .lock()
                    .map_err(|_| SnapshotError::Device("balloon lock poisoned".into()))?
                    .save_state(),
            }),
            None => None,
        };
        let mut nets = Vec::with_capacity(self.nets.len());
        for slot in &self.nets {
            nets.push(NetSlotState {
                base: slot.base,
                irq: slot.irq,
                transport: slot
                    .transport
                    .lock()
                    .map_err(|_| {
                        SnapshotError::Device("virtio-net transport lock poisoned".into())
                    })?
                    .save_state(),
                device: slot
                    .device
                    .lock()
                    .map_err(|_| SnapshotError::Device("virtio-net lock poisoned".into()))?
                    .save_state(),
            });
        }
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
            fs,
            balloon,
            nets,
        };
        file::write(&state_path, &state)?;
        Ok(())
    }
}
