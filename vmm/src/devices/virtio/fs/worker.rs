//! The FUSE server thread of one virtio-fs device.
//!
//! Why a thread of its own rather than the VMM's event loop: FUSE requests
//! make blocking host system calls (a 1 MiB read from a cold disk, an fsync)
//! that would stall vsock and every other device on the event loop; and the
//! passthrough filesystem changes per-thread state that must not leak into
//! the rest of the VMM. [`restrict_thread`] gives the thread its own
//! `fs_struct` (passthrough's `import()` sets `umask(0)`, which would
//! otherwise apply to the whole process, e.g. to the vsock socket files)
//! and drops `CAP_FSETID`, `CAP_MKNOD` and `CAP_SETFCAP` from it for good,
//! so the host kernel clears set-user-ID bits on every write the guest makes
//! and refuses device nodes even if a policy check were missed. The vCPU
//! threads only signal the queue ioeventfds and never wait for this thread.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::PassthroughFs;
use fuse_backend_rs::transport::{FsCacheReqHandler, Reader, VirtioFsWriter};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::confine::ConfinedFs;
use super::dax::{DaxHandler, DaxWindow};
use crate::devices::virtio::{guest_wants_interrupt, Interrupt, VIRTIO_MMIO_INT_VRING};

/// The filesystem behind a device: passthrough under our policy.
pub type ShareFs = ConfinedFs<PassthroughFs>;
/// The FUSE server of a device.
pub type FsServer = Server<Arc<ShareFs>>;

/// Capabilities the FUSE thread never needs and must not have.
const DROPPED_CAPS: [caps::Capability; 3] = [
    caps::Capability::CAP_FSETID,
    caps::Capability::CAP_MKNOD,
    caps::Capability::CAP_SETFCAP,
];

/// Epoll token of the stop eventfd; queue `i` uses token `i`.
const STOP_TOKEN: u64 = u64::MAX;

/// Confines the calling thread for serving FUSE requests: a private
/// `fs_struct` (umask, cwd) and no `CAP_FSETID`/`CAP_MKNOD`/`CAP_SETFCAP`
/// in its effective or permitted sets (so a later return to uid 0 cannot
/// bring them back).
pub fn restrict_thread() -> io::Result<()> {
    // SAFETY: unshare(CLONE_FS) only detaches this thread's cwd/root/umask
    // from the other threads; no memory is passed.
    if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    for cap in DROPPED_CAPS {
        for set in [caps::CapSet::Effective, caps::CapSet::Permitted] {
            caps::drop(None, set, cap).map_err(|e| io::Error::other(e.to_string()))?;
        }
    }
    Ok(())
}

/// Counts malformed requests and logs the first of each power of two.
#[derive(Default)]
pub struct BadRequests(u64);

impl BadRequests {
    fn log(&mut self, tag: &str, what: &dyn std::fmt::Display) {
        self.0 += 1;
        if self.0.is_power_of_two() {
            tracing::warn!(tag, count = self.0, "virtio-fs: bad request: {what}");
        }
    }
}

/// Answers one request chain; returns the number of bytes written into it.
fn handle_chain(
    server: &FsServer,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    cache: Option<&mut dyn FsCacheReqHandler>,
    tag: &str,
    bad: &mut BadRequests,
) -> u32 {
    let reader = match Reader::from_descriptor_chain(mem, chain.clone()) {
        Ok(r) => r,
        Err(e) => {
            bad.log(tag, &e);
            return 0;
        }
    };
    let writer = match VirtioFsWriter::new(mem, chain) {
        Ok(w) => w,
        Err(e) => {
            bad.log(tag, &e);
            return 0;
        }
    };
    match server.handle_message(reader, writer.into(), cache, None) {
        Ok(n) => u32::try_from(n).unwrap_or(0),
        Err(e) => {
            bad.log(tag, &e);
            0
        }
    }
}

/// Serves every available chain of `queue`. Returns whether used buffers
/// were added.
pub fn process_queue(
    server: &FsServer,
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    mut cache: Option<&mut (dyn FsCacheReqHandler + 'static)>,
    tag: &str,
    bad: &mut BadRequests,
) -> bool {
    let mut used = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let cache = cache
            .as_mut()
            .map(|c| &mut **c as &mut dyn FsCacheReqHandler);
        let len = handle_chain(server, mem, chain, cache, tag, bad);
        if let Err(e) = queue.add_used(mem, head, len) {
            bad.log(tag, &format!("add_used: {e:?}"));
            break;
        }
        used = true;
    }
    used
}

/// What the thread owns.
struct WorkerState {
    tag: String,
    server: Arc<FsServer>,
    fs: Arc<ShareFs>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    stop: EventFd,
    /// The handler of SETUPMAPPING/REMOVEMAPPING when the device has a DAX
    /// window. `None`: those requests fail with EINVAL.
    cache: Option<Box<dyn FsCacheReqHandler>>,
    /// The window itself, emptied when the thread ends (device reset).
    dax: Option<Arc<DaxWindow>>,
    /// Set once a request has been answered (see `VirtioFs::used`).
    used: Arc<AtomicBool>,
}

/// A running FUSE server thread.
pub struct Worker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts the thread serving `queues` (hiprio first), woken by
    /// `queue_evts` (duplicates of the device's ioeventfds).
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        tag: &str,
        server: Arc<FsServer>,
        fs: Arc<ShareFs>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
        used: Arc<AtomicBool>,
        dax: Option<Arc<DaxWindow>>,
        read_only: bool,
    ) -> io::Result<Worker> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let state = WorkerState {
            tag: tag.to_string(),
            server,
            fs,
            mem,
            interrupt,
            queues,
            queue_evts,
            stop: stop.try_clone()?,
            cache: dax.as_ref().map(|w| {
                Box::new(DaxHandler::new(w.clone(), read_only)) as Box<dyn FsCacheReqHandler>
            }),
            dax,
            used,
        };
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("fs-{tag}"))
            .spawn(move || {
                let setup = restrict_thread().and_then(|()| state.epoll());
                match setup {
                    Ok(epoll) => {
                        let _ = ready_tx.send(Ok(()));
                        state.run(&epoll);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })?;
        let ready = ready_rx
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("virtio-fs thread died at start")));
        let mut worker = Worker {
            stop,
            thread: Some(thread),
        };
        if let Err(e) = ready {
            worker.join();
            return Err(e);
        }
        Ok(worker)
    }

    fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("virtio-fs thread panicked");
            }
        }
    }

    /// Stops the thread and waits for it (it finishes the request at hand).
    pub fn stop(mut self) {
        let _ = self.stop.write(1);
        self.join();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        self.join();
    }
}

impl WorkerState {
    fn epoll(&self) -> io::Result<Epoll> {
        let epoll = Epoll::new()?;
        for (i, evt) in self.queue_evts.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                evt.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        epoll.ctl(
            ControlOperation::Add,
            self.stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        Ok(epoll)
    }

    fn run(mut self, epoll: &Epoll) {
        let mut bad = BadRequests::default();
        let mut events = vec![EpollEvent::default(); self.queue_evts.len() + 1];
        // Requests the guest queued before the thread started.
        self.serve(0..self.queues.len(), &mut bad);
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(tag = self.tag, "virtio-fs: epoll failed: {e}");
                    break;
                }
            };
            let mut ready = Vec::with_capacity(n);
            let mut stop = false;
            for ev in events.iter().take(n) {
                match ev.data() {
                    STOP_TOKEN => stop = true,
                    i => {
                        if let Some(evt) =
                            usize::try_from(i).ok().and_then(|i| self.queue_evts.get(i))
                        {
                            let _ = evt.read();
                            ready.push(i as usize);
                        }
                    }
                }
            }
            if stop {
                break;
            }
            self.serve(ready, &mut bad);
        }
        // On this thread: destroy() re-imports the root, which sets umask(0).
        self.fs.destroy();
        // The guest driver is gone: drop its mappings so that the host
        // files are no longer held.
        if let Some(w) = &self.dax {
            tracing::info!(
                tag = self.tag,
                setups = w.setups(),
                removals = w.removals(),
                "virtio-fs: DAX window emptied"
            );
            if let Err(e) = w.unmap_all() {
                tracing::error!(
                    tag = self.tag,
                    "virtio-fs: cannot empty the DAX window: {e}"
                );
            }
        }
    }

    fn serve(&mut self, ready: impl IntoIterator<Item = usize>, bad: &mut BadRequests) {
        let mut signal = false;
        for i in ready {
            let Some(queue) = self.queues.get_mut(i) else {
                continue;
            };
            let cache = self
                .cache
                .as_mut()
                .map(|c| &mut **c as &mut (dyn FsCacheReqHandler + 'static));
            if process_queue(&self.server, &self.mem, queue, cache, &self.tag, bad) {
                self.used.store(true, Ordering::Relaxed);
                signal |= guest_wants_interrupt(&self.mem, queue);
            }
        }
        if signal {
            if let Err(e) = self.interrupt.trigger(VIRTIO_MMIO_INT_VRING) {
                tracing::error!(tag = self.tag, "virtio-fs: cannot raise interrupt: {e}");
            }
        }
    }
}
