//! The test VMM: a vhost-user-blk frontend over a real unix socket.
//!
//! [`Frontend::connect`] does what QEMU's `vhost-user-blk` device does at start: owns the
//! session, negotiates virtio and protocol features, reads the virtio-blk config space, shares a
//! memfd as guest memory (`SET_MEM_TABLE`) and sets up each queue (`SET_VRING_*`), with one kick
//! and one call eventfd per queue. The queues are then taken out as [`Vring`]s, each `Send`, to
//! be driven from their own threads. Every socket operation and every wait has a timeout, so a
//! backend that stops answering fails the test instead of hanging it.
//!
//! With the `INFLIGHT_SHMFD` protocol feature (offered and [`Options::inflight`]), it asks the
//! backend for an inflight region before starting the queues and keeps it, as QEMU does;
//! [`Frontend::reconnect`] is QEMU's reconnection after a backend died: the same guest memory,
//! rings and region handed to a new backend, each queue resuming from its used index.
//!
//! Guest memory layout: one region at guest address 0, split evenly between the queues; each
//! share starts with the rings of its queue (page aligned) followed by buffer space for requests.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight};
use vhost::vhost_user::{
    Frontend as VuFrontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{Address, FileOffset, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::virtq::{self, Memory, SplitQueue, Used};

const PAGE: u64 = 4096;

/// virtio-blk features the test VMM understands and accepts when offered.
const BLK_FEATURES: u64 = 1 << VIRTIO_F_VERSION_1
    | 1 << VIRTIO_BLK_F_SIZE_MAX
    | 1 << VIRTIO_BLK_F_SEG_MAX
    | 1 << VIRTIO_BLK_F_GEOMETRY
    | 1 << VIRTIO_BLK_F_RO
    | 1 << VIRTIO_BLK_F_BLK_SIZE
    | 1 << VIRTIO_BLK_F_FLUSH
    | 1 << VIRTIO_BLK_F_TOPOLOGY
    | 1 << VIRTIO_BLK_F_MQ
    | 1 << VIRTIO_BLK_F_DISCARD
    | 1 << VIRTIO_BLK_F_WRITE_ZEROES;

/// Errors of the test VMM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot connect to {}", .path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Vhost-user {op} failed")]
    Vhost {
        op: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("Backend does not offer {0}")]
    MissingFeature(&'static str),
    #[error("Backend offers {offered} queues, {wanted} wanted")]
    TooFewQueues { offered: u64, wanted: u16 },
    #[error("{mem_size} bytes of guest memory cannot hold {queues} queues of {queue_size} entries and their buffers")]
    MemoryTooSmall { mem_size: u64, queues: u16, queue_size: u16 },
    #[error("Cannot create the guest memory file")]
    MemFile(#[source] io::Error),
    #[error("Cannot map guest memory")]
    Mmap(#[source] vm_memory::mmap::FromRangesError),
    #[error("Guest memory has no host address at {0:#x}")]
    HostAddress(u64),
    #[error("Operation on queue {index} failed")]
    Queue {
        index: u16,
        #[source]
        source: virtq::Error,
    },
    #[error("Eventfd operation failed")]
    EventFd(#[source] io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// How the test VMM sets up the device.
#[derive(Clone, Debug)]
pub struct Options {
    /// Queues to set up.
    pub queues: u16,
    /// Entries per queue (a power of two).
    pub queue_size: u16,
    /// Bytes of guest memory, shared evenly between the queues.
    pub mem_size: u64,
    /// Accept `VIRTIO_RING_F_EVENT_IDX` if the backend offers it.
    pub event_idx: bool,
    /// Limit for each socket operation and the default limit for each wait on a queue.
    pub timeout: Duration,
    /// Virtio features not to acknowledge though offered: a driver that lacks them (bit masks
    /// of `1 << VIRTIO_BLK_F_*`).
    pub withhold_features: u64,
    /// Use `INFLIGHT_SHMFD` if the backend offers it (QEMU's vhost-user-blk always does).
    pub inflight: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            queues: 1,
            queue_size: 256,
            mem_size: 64 << 20,
            event_idx: true,
            timeout: Duration::from_secs(10),
            withhold_features: 0,
            inflight: true,
        }
    }
}

/// The virtio-blk config space (virtio 1.2 §5.2.4, up to `write_zeroes_may_unmap`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlkConfig {
    /// Size in 512-byte sectors.
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub blk_size: u32,
    pub physical_block_exp: u8,
    pub min_io_size: u16,
    pub opt_io_size: u32,
    pub wce: u8,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: bool,
}

impl BlkConfig {
    /// Bytes read with `GET_CONFIG`: the layout QEMU 7.2 knows (newer fields are not asked for,
    /// since `qemu-storage-daemon` refuses requests larger than its own struct).
    pub const SIZE: usize = 60;

    /// Parses the little-endian config space.
    pub fn parse(b: &[u8; Self::SIZE]) -> Self {
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        BlkConfig {
            capacity: u64::from(u32_at(0)) | u64::from(u32_at(4)) << 32,
            size_max: u32_at(8),
            seg_max: u32_at(12),
            blk_size: u32_at(20),
            physical_block_exp: b[24],
            min_io_size: u16_at(26),
            opt_io_size: u32_at(28),
            wce: b[32],
            num_queues: u16_at(34),
            max_discard_sectors: u32_at(36),
            max_discard_seg: u32_at(40),
            discard_sector_alignment: u32_at(44),
            max_write_zeroes_sectors: u32_at(48),
            max_write_zeroes_seg: u32_at(52),
            write_zeroes_may_unmap: b[56] != 0,
        }
    }
}

/// A connected, configured vhost-user-blk device. Dropping it closes the socket.
pub struct Frontend {
    vu: VuFrontend,
    mem: Arc<Memory>,
    offered_features: u64,
    features: u64,
    protocol_features: VhostUserProtocolFeatures,
    max_queues: u64,
    config: BlkConfig,
    vrings: Vec<Vring>,
    /// The inflight region the backend gave, kept for the next one.
    inflight: Option<(VhostUserInflight, File)>,
}

/// What the handshake settled.
struct Negotiated {
    offered_features: u64,
    features: u64,
    protocol_features: VhostUserProtocolFeatures,
    max_queues: u64,
    config: BlkConfig,
}

impl std::fmt::Debug for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frontend")
            .field("features", &format_args!("{:#x}", self.features))
            .field("protocol_features", &self.protocol_features)
            .field("config", &self.config)
            .field("vrings", &self.vrings)
            .finish_non_exhaustive()
    }
}

impl Frontend {
    /// Connects to the backend listening on `socket` and sets the device up as `opts` says.
    pub fn connect(socket: &Path, opts: &Options) -> Result<Self> {
        let mut vu = open(socket, opts)?;
        let n = negotiate(&mut vu, opts)?;
        let op = |op| move |source| Error::Vhost { op, source };
        let inflight = if n.protocol_features.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
            let ask = VhostUserInflight { num_queues: opts.queues, queue_size: opts.queue_size, ..Default::default() };
            let (msg, file) = vu.get_inflight_fd(&ask).map_err(op("GET_INFLIGHT_FD"))?;
            vu.set_inflight_fd(&msg, file.as_raw_fd()).map_err(op("SET_INFLIGHT_FD"))?;
            Some((msg, file))
        } else {
            None
        };
        let mem = Arc::new(guest_memory(opts.mem_size)?);
        set_mem_table(&mut vu, &mem)?;

        let area = (opts.mem_size / u64::from(opts.queues.max(1))) / PAGE * PAGE;
        let rings = SplitQueue::layout_size(opts.queue_size).next_multiple_of(PAGE);
        if opts.queues == 0 || area < rings + PAGE {
            return Err(Error::MemoryTooSmall {
                mem_size: opts.mem_size,
                queues: opts.queues,
                queue_size: opts.queue_size,
            });
        }
        let event_idx = n.features & 1 << VIRTIO_RING_F_EVENT_IDX != 0;
        let mut vrings = Vec::with_capacity(usize::from(opts.queues));
        for index in 0..opts.queues {
            let base = GuestAddress(u64::from(index) * area);
            let queue = SplitQueue::new(mem.clone(), base, opts.queue_size, event_idx)
                .map_err(|source| Error::Queue { index, source })?;
            let vring = Vring {
                index,
                queue,
                kick: EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?,
                call: EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?,
                buffers: (base.unchecked_add(rings), area - rings),
                timeout: opts.timeout,
            };
            start_vring(&mut vu, &mem, &vring, 0)?;
            vrings.push(vring);
        }
        let Negotiated { offered_features, features, protocol_features, max_queues, config } = n;
        Ok(Frontend { vu, mem, offered_features, features, protocol_features, max_queues, config, vrings, inflight })
    }

    /// What QEMU does when its backend went away and a new one listens on `socket`: sets the
    /// device up again on the same guest memory, hands back the inflight region (if the new
    /// backend offers the feature) and starts `vrings` (the queues taken out earlier, in index
    /// order), each from its used index, as QEMU restores a queue whose backend died.
    pub fn reconnect(&mut self, socket: &Path, opts: &Options, vrings: &[&Vring]) -> Result<()> {
        let mut vu = open(socket, opts)?;
        let n = negotiate(&mut vu, opts)?;
        let op = |op| move |source| Error::Vhost { op, source };
        if n.protocol_features.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
            if let Some((msg, file)) = &self.inflight {
                vu.set_inflight_fd(msg, file.as_raw_fd()).map_err(op("SET_INFLIGHT_FD"))?;
            }
        }
        set_mem_table(&mut vu, &self.mem)?;
        for vring in vrings {
            let index = vring.index;
            let used = vring.queue.used_idx().map_err(|source| Error::Queue { index, source })?;
            start_vring(&mut vu, &self.mem, vring, used)?;
        }
        self.vu = vu;
        self.features = n.features;
        self.protocol_features = n.protocol_features;
        self.config = n.config;
        Ok(())
    }

    /// The inflight region's descriptor and file, if the backend gave one.
    pub fn inflight(&self) -> Option<&(VhostUserInflight, File)> {
        self.inflight.as_ref()
    }

    /// The config space read at connection.
    pub fn config(&self) -> &BlkConfig {
        &self.config
    }

    /// Reads the config space again (it is read once before the features are set).
    pub fn read_config(&mut self) -> Result<BlkConfig> {
        let op = |source| Error::Vhost { op: "GET_CONFIG", source };
        let (_, raw) = self
            .vu
            .get_config(0, BlkConfig::SIZE as u32, VhostUserConfigFlags::empty(), &[0; BlkConfig::SIZE])
            .map_err(op)?;
        let raw: &[u8; BlkConfig::SIZE] = raw.as_slice().try_into().map_err(|_| op(vhost::Error::InvalidOperation))?;
        Ok(BlkConfig::parse(raw))
    }

    /// Virtio features the backend offered.
    pub fn offered_features(&self) -> u64 {
        self.offered_features
    }

    /// Virtio features acknowledged (the offered ones the test VMM understands).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Protocol features acknowledged.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol_features
    }

    /// Queues the backend supports (`GET_QUEUE_NUM`, 1 without the MQ protocol feature).
    pub fn max_queues(&self) -> u64 {
        self.max_queues
    }

    pub fn mem(&self) -> &Arc<Memory> {
        &self.mem
    }

    /// Takes the configured queues out, in index order, to be driven (each from any thread).
    /// Later calls return an empty vector.
    pub fn take_queues(&mut self) -> Vec<Vring> {
        std::mem::take(&mut self.vrings)
    }

    /// The vhost-user session, for tests that send messages of their own.
    pub fn vhost(&mut self) -> &mut VuFrontend {
        &mut self.vu
    }
}

/// Connects to `socket` with the timeouts of `opts`.
fn open(socket: &Path, opts: &Options) -> Result<VuFrontend> {
    let connect_err = |source| Error::Connect { path: socket.to_path_buf(), source };
    let stream = connect_retrying(socket, opts.timeout).map_err(connect_err)?;
    stream.set_read_timeout(Some(opts.timeout)).map_err(connect_err)?;
    stream.set_write_timeout(Some(opts.timeout)).map_err(connect_err)?;
    Ok(VuFrontend::from_stream(stream, u64::from(opts.queues)))
}

/// Owns the session, negotiates features and reads the config space.
fn negotiate(vu: &mut VuFrontend, opts: &Options) -> Result<Negotiated> {
    let op = |op| move |source| Error::Vhost { op, source };
    vu.set_owner().map_err(op("SET_OWNER"))?;
    let offered_features = vu.get_features().map_err(op("GET_FEATURES"))?;
    let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if offered_features & 1 << VIRTIO_F_VERSION_1 == 0 {
        return Err(Error::MissingFeature("VIRTIO_F_VERSION_1"));
    }
    if offered_features & protocol_bit == 0 {
        return Err(Error::MissingFeature("VHOST_USER_F_PROTOCOL_FEATURES"));
    }
    let offered_proto = vu.get_protocol_features().map_err(op("GET_PROTOCOL_FEATURES"))?;
    if !offered_proto.contains(VhostUserProtocolFeatures::CONFIG) {
        return Err(Error::MissingFeature("VHOST_USER_PROTOCOL_F_CONFIG"));
    }
    let mut wanted_proto =
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
    if opts.inflight {
        wanted_proto |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    }
    let protocol_features = offered_proto & wanted_proto;
    vu.set_protocol_features(protocol_features).map_err(op("SET_PROTOCOL_FEATURES"))?;
    let max_queues = if protocol_features.contains(VhostUserProtocolFeatures::MQ) {
        vu.get_queue_num().map_err(op("GET_QUEUE_NUM"))?
    } else {
        1
    };
    if max_queues < u64::from(opts.queues) {
        return Err(Error::TooFewQueues { offered: max_queues, wanted: opts.queues });
    }

    let (_, raw) = vu
        .get_config(0, BlkConfig::SIZE as u32, VhostUserConfigFlags::empty(), &[0; BlkConfig::SIZE])
        .map_err(op("GET_CONFIG"))?;
    let raw: &[u8; BlkConfig::SIZE] =
        raw.as_slice().try_into().map_err(|_| op("GET_CONFIG")(vhost::Error::InvalidOperation))?;
    let config = BlkConfig::parse(raw);

    let mut wanted = BLK_FEATURES | protocol_bit;
    if opts.event_idx {
        wanted |= 1 << VIRTIO_RING_F_EVENT_IDX;
    }
    let features = offered_features & wanted & !opts.withhold_features;
    if opts.queues > 1 && features & 1 << VIRTIO_BLK_F_MQ == 0 {
        return Err(Error::MissingFeature("VIRTIO_BLK_F_MQ"));
    }
    vu.set_features(features).map_err(op("SET_FEATURES"))?;
    if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
        // From now on every request is acknowledged, so a refusal surfaces where it happens.
        vu.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    }
    Ok(Negotiated { offered_features, features, protocol_features, max_queues, config })
}

fn set_mem_table(vu: &mut VuFrontend, mem: &Memory) -> Result<()> {
    let op = |source| Error::Vhost { op: "SET_MEM_TABLE", source };
    let regions = mem
        .iter()
        .map(VhostUserMemoryRegionInfo::from_guest_region)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(op)?;
    vu.set_mem_table(&regions).map_err(op)?;
    Ok(())
}

/// Sets a queue up on the backend and starts it, its available ring from `base`.
fn start_vring(vu: &mut VuFrontend, mem: &Memory, vring: &Vring, base: u16) -> Result<()> {
    let op = |op| move |source| Error::Vhost { op, source };
    let (desc, avail, used) = vring.queue.addresses();
    let host =
        |a: GuestAddress| mem.get_host_address(a).map(|p| p as u64).map_err(|_| Error::HostAddress(a.raw_value()));
    let size = vring.queue.size();
    let config = VringConfigData {
        queue_max_size: size,
        queue_size: size,
        flags: 0,
        desc_table_addr: host(desc)?,
        used_ring_addr: host(used)?,
        avail_ring_addr: host(avail)?,
        log_addr: None,
    };
    let i = usize::from(vring.index);
    vu.set_vring_num(i, size).map_err(op("SET_VRING_NUM"))?;
    vu.set_vring_base(i, base).map_err(op("SET_VRING_BASE"))?;
    vu.set_vring_addr(i, &config).map_err(op("SET_VRING_ADDR"))?;
    vu.set_vring_call(i, &vring.call).map_err(op("SET_VRING_CALL"))?;
    vu.set_vring_kick(i, &vring.kick).map_err(op("SET_VRING_KICK"))?;
    vu.set_vring_enable(i, true).map_err(op("SET_VRING_ENABLE"))?;
    Ok(())
}

/// A memfd of `size` bytes mapped shared at guest address 0.
fn guest_memory(size: u64) -> Result<Memory> {
    // SAFETY: the name is a NUL-terminated literal; memfd_create only reads it.
    let fd = unsafe { libc::memfd_create(c"livesnap-test-vmm".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::MemFile(io::Error::last_os_error()));
    }
    // SAFETY: memfd_create just returned this descriptor, which nothing else owns.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size).map_err(Error::MemFile)?;
    let len = usize::try_from(size).map_err(|_| Error::MemFile(io::ErrorKind::InvalidInput.into()))?;
    Memory::from_ranges_with_files([(GuestAddress(0), len, Some(FileOffset::new(file, 0)))]).map_err(Error::Mmap)
}

/// One queue of the device with its eventfds and buffer space; `Send`.
#[derive(Debug)]
pub struct Vring {
    index: u16,
    queue: SplitQueue,
    kick: EventFd,
    call: EventFd,
    buffers: (GuestAddress, u64),
    timeout: Duration,
}

impl Vring {
    pub fn index(&self) -> u16 {
        self.index
    }

    pub fn queue(&self) -> &SplitQueue {
        &self.queue
    }

    pub fn queue_mut(&mut self) -> &mut SplitQueue {
        &mut self.queue
    }

    pub fn mem(&self) -> &Arc<Memory> {
        self.queue.mem()
    }

    /// Guest memory reserved for this queue's request buffers: start and length.
    pub fn buffers(&self) -> (GuestAddress, u64) {
        self.buffers
    }

    /// The default limit of a wait, from [`Options::timeout`].
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Notifies the backend unconditionally.
    pub fn kick(&self) -> io::Result<()> {
        self.kick.write(1)
    }

    /// Publishes the chains added since the last call and kicks if the backend wants it.
    pub fn notify(&mut self) -> Result<()> {
        let index = self.index;
        if self.queue.publish().map_err(|source| Error::Queue { index, source })? {
            self.kick().map_err(Error::EventFd)?;
        }
        Ok(())
    }

    /// Waits at most `timeout` for the backend to signal the call eventfd and clears it.
    /// Returns whether it was signalled.
    pub fn wait_call(&self, timeout: Duration) -> io::Result<bool> {
        if !wait_readable(self.call.as_raw_fd(), timeout)? {
            return Ok(false);
        }
        match self.call.read() {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Reaps the next used element, waiting for it at most `timeout`; `None` on timeout.
    pub fn wait_used(&mut self, timeout: Duration) -> std::result::Result<Option<Used>, virtq::Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(used) = self.queue.pop_used()? {
                return Ok(Some(used));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            // An error of poll(2) on our own eventfd is treated like a spurious wake-up.
            let _ = self.wait_call(left);
        }
    }
}

/// Connects to `socket`, retrying for at most `timeout` while it is missing or refuses: a
/// backend's socket file can appear (bind) a moment before it listens.
fn connect_retrying(socket: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(socket) {
            Err(e)
                if matches!(e.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound)
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            r => return r,
        }
    }
}

/// poll(2) for readability of `fd`, at most `timeout` (rounded up to a millisecond).
fn wait_readable(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    let ms = libc::c_int::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX);
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    loop {
        // SAFETY: `pfd` is a valid pollfd that outlives the call, and nfds is 1.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n >= 0 {
            return Ok(n > 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
