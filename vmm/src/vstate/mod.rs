//! KVM, wrapped once: the VM (`vm`), its vCPUs (`vcpu`) and guest memory
//! (`memory`). The rest of the VMM does not call kvm-ioctls directly.

pub mod memory;
pub mod vcpu;
pub mod vcpu_state;
pub mod vcpu_thread;
pub mod vm;
