//! The virtio-fs device as the transport sees it: queues, configuration
//! space, activation (which starts the FUSE server thread) and reset.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::confine::ConfinedFs;
use super::dax::DaxWindow;
use super::worker::{FsServer, ShareFs, Worker};
use super::{FsError, ShareConfig, TAG_MAX_LEN};
use crate::devices::virtio::{device_type, ActivateError, Interrupt, VirtioDevice};

/// Number of request queues (besides the high-priority queue).
pub const NUM_REQUEST_QUEUES: u32 = 1;
/// Queue sizes: high-priority queue, then the request queue.
const QUEUE_SIZES: [u16; 2] = [128, 1024];
/// `struct virtio_fs_config`: tag[36], le32 num_request_queues.
const CONFIG_SIZE: usize = TAG_MAX_LEN + 4;

enum DeviceState {
    Inactive,
    Active(Worker),
}

/// A virtio-fs device exporting one host directory.
pub struct VirtioFs {
    tag: String,
    config: [u8; CONFIG_SIZE],
    acked_features: u64,
    queue_evts: Vec<EventFd>,
    fs: Arc<ShareFs>,
    server: Arc<FsServer>,
    state: DeviceState,
    /// Set by the FUSE thread once it answered a request.
    used: Arc<AtomicBool>,
    read_only: bool,
    /// The DAX window, if the share has one.
    dax: Option<Arc<DaxWindow>>,
}

/// How long the guest may trust names and attributes of a read-only share
/// (and cache that a name does not exist): a day, virtiofsd's
/// `cache=always`. Read-write shares keep the passthrough's 5 s.
pub const READ_ONLY_TIMEOUT: Duration = Duration::from_secs(86_400);

/// The passthrough settings we use; see `vmm/VIRTIOFS.md` for why.
pub fn passthrough_config(root_dir: String, read_only: bool, dax: bool) -> Config {
    let defaults = Config::default();
    // A read-only share is an image nobody changes while the container
    // runs: its data already stays in the guest's page cache across opens
    // (`Always`), and its names and attributes may be trusted as long.
    // With the 5 s default every path component of an exec was looked up
    // again (a FUSE round trip, ~20 ms here) once 5 s had passed.
    let (entry_timeout, attr_timeout) = if read_only {
        (READ_ONLY_TIMEOUT, READ_ONLY_TIMEOUT)
    } else {
        (defaults.entry_timeout, defaults.attr_timeout)
    };
    Config {
        root_dir,
        entry_timeout,
        attr_timeout,
        // Read-write shares: guest page cache with close-to-open
        // consistency, so changes made on the host show up at the next
        // open. Read-only shares (container images) keep their guest page
        // cache across opens: with Auto, every exec of a binary re-read it
        // through FUSE, the bulk of a container's start time on PVM hosts.
        cache_policy: if read_only {
            CachePolicy::Always
        } else {
            CachePolicy::Auto
        },
        // Would open O_WRONLY files O_RDWR (reads of write-only files).
        writeback: false,
        // security.capability / trusted.* would be escalation paths.
        xattr: false,
        // Never open_by_handle_at: inodes are O_PATH fds.
        inode_file_handles: false,
        // The host kernel, not the guest, clears set-id bits on writes.
        killpriv_v2: false,
        no_open: false,
        no_opendir: false,
        do_import: true,
        // With a DAX window every file is marked FUSE_ATTR_DAX, so the
        // guest's default per-inode mode (`dax=inode`) uses DAX for all of
        // them, like `dax=always`. Without a window the flag is never set.
        dax_file_size: dax.then_some(0),
        ..defaults
    }
}

/// The confined passthrough filesystem and its FUSE server for `share`.
/// Fails when the directory cannot be opened.
pub fn new_server(share: &ShareConfig) -> Result<(Arc<ShareFs>, Arc<FsServer>), FsError> {
    share.validate()?;
    let open_err = |source| FsError::Open {
        tag: share.tag.clone(),
        dir: share.dir.clone(),
        source,
    };
    // Resolve symlinks in the (trusted) host path once, here: the
    // passthrough opens its root with O_NOFOLLOW.
    let dir = std::fs::canonicalize(&share.dir).map_err(open_err)?;
    let root_dir = dir
        .to_str()
        .ok_or_else(|| {
            open_err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the path is not UTF-8",
            ))
        })?
        .to_string();
    // Fail now rather than at the guest's FUSE INIT if it cannot be opened.
    let c = CString::new(dir.as_os_str().as_bytes()).map_err(|e| open_err(e.into()))?;
    // SAFETY: `c` is a valid NUL-terminated path; the returned fd is closed below.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(open_err(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just opened by us and is not used afterwards.
    unsafe { libc::close(fd) };
    let pfs = PassthroughFs::new(passthrough_config(
        root_dir,
        share.read_only,
        share.dax_window.is_some(),
    ))
    .map_err(|source| FsError::Backend {
        tag: share.tag.clone(),
        source,
    })?;
    let mut fs = ConfinedFs::new(pfs, share.read_only);
    if share.read_only {
        fs = fs.with_negative_entries(READ_ONLY_TIMEOUT);
    }
    let fs = Arc::new(fs);
    let server = Arc::new(Server::new(fs.clone()));
    Ok((fs, server))
}

impl VirtioFs {
    /// A device for `share`; checks the tag and opens the directory.
    pub fn new(share: &ShareConfig) -> Result<VirtioFs, FsError> {
        let (fs, server) = new_server(share)?;
        let mut config = [0u8; CONFIG_SIZE];
        config[..share.tag.len()].copy_from_slice(share.tag.as_bytes());
        config[TAG_MAX_LEN..].copy_from_slice(&NUM_REQUEST_QUEUES.to_le_bytes());
        let queue_evts = QUEUE_SIZES
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| FsError::Os {
                what: "eventfd",
                source,
            })?;
        Ok(VirtioFs {
            tag: share.tag.clone(),
            config,
            acked_features: 0,
            queue_evts,
            fs,
            server,
            state: DeviceState::Inactive,
            used: Arc::new(AtomicBool::new(false)),
            read_only: share.read_only,
            dax: None,
        })
    }

    /// Gives the device its DAX window (before the guest activates it).
    pub fn set_dax_window(&mut self, window: Arc<DaxWindow>) {
        self.dax = Some(window);
    }

    /// The DAX window, if any.
    pub fn dax_window(&self) -> Option<&Arc<DaxWindow>> {
        self.dax.as_ref()
    }

    /// The share's tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Whether the FUSE server has answered a request (the guest mounted
    /// the share): then its state matters and a snapshot cannot carry it.
    pub fn used(&self) -> bool {
        self.used.load(Ordering::Relaxed)
    }

    /// Makes a device of a restored VM match the snapshot: the features
    /// the driver acked, and, when the driver had activated the device,
    /// its queues (positions from the snapshot), which starts the FUSE
    /// server on this device's (new) directory. Only valid for snapshots
    /// whose device never served a request (see [`VirtioFs::used`]): the
    /// FUSE server's state (inodes, handles) is not part of a snapshot.
    pub fn restore_state(
        &mut self,
        acked_features: u64,
        queues: Option<Vec<Queue>>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        self.acked_features = acked_features;
        if let Some(queues) = queues {
            if queues.iter().any(|q| !q.is_valid(&mem)) {
                return Err(ActivateError::BadQueue(
                    "a saved queue is not valid in guest memory".into(),
                ));
            }
            self.activate(mem, interrupt, queues)?;
        }
        Ok(())
    }
}

impl VirtioDevice for VirtioFs {
    fn device_type(&self) -> u32 {
        device_type::FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        0
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::devices::virtio::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        tracing::debug!(
            tag = self.tag,
            "virtio-fs: write to read-only config space ignored"
        );
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if queues.len() != QUEUE_SIZES.len() || !queues.iter().all(|q| q.ready()) {
            return Err(ActivateError::BadQueue(
                "virtio-fs needs its high-priority and request queues ready".into(),
            ));
        }
        let evts = self
            .queue_evts
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(ActivateError::Backend)?;
        let worker = Worker::spawn(
            &self.tag,
            self.server.clone(),
            self.fs.clone(),
            mem,
            interrupt,
            queues,
            evts,
            self.used.clone(),
            self.dax.clone(),
            self.read_only,
        )
        .map_err(ActivateError::Backend)?;
        self.state = DeviceState::Active(worker);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        // Joining waits for the request at hand; the worker forgets every
        // inode and handle before it ends.
        if let DeviceState::Active(worker) =
            std::mem::replace(&mut self.state, DeviceState::Inactive)
        {
            worker.stop();
        }
        true
    }

    fn is_activated(&self) -> bool {
        matches!(self.state, DeviceState::Active(_))
    }
}
