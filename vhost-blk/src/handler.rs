//! The vhost-user protocol of one frontend connection: guest memory, the queues, their worker
//! threads, and the inflight region (`GET_INFLIGHT_FD` / `SET_INFLIGHT_FD`).
//!
//! rust-vmm's vhost-user-backend answers the inflight requests "not supported" and keeps its
//! request handler private (no way to wrap it), so this is our own handler on the vhost crate's
//! protocol layer, doing what vhost-user-backend's does for the requests livesnap-blk offers
//! and using its vring type. What it adds: a queue that starts on an inflight region resumes
//! where the previous backend stopped taking requests and runs the ones it left in flight first
//! ([`crate::inflight`]).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use tracing::{debug, error, info};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight, VhostUserLog,
    VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVirtioFeatures, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::{BlkBackend, Queue, MAX_QUEUE_SIZE};
use crate::inflight::{self, Region};

/// Epoll tokens of a queue's worker.
const KICK: u64 = 0;
const WAKE: u64 = 1;

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot create a queue")]
    Vring(#[source] virtio_queue::Error),
    #[error("Cannot create a queue worker's event")]
    Event(#[source] io::Error),
    #[error("Cannot start a queue worker")]
    Spawn(#[source] io::Error),
}

/// A request the frontend sent that this handler refuses, with why; rides in the vhost crate's
/// `ReqHandlerError` so that the frontend gets a failure and the log says why.
fn refuse(e: impl std::error::Error + Send + Sync + 'static) -> VuError {
    debug!(error = %livesnap_proto::error::chain(&e), "refusing a vhost-user request");
    VuError::ReqHandlerError(io::Error::other(e))
}

/// A queue and its worker thread.
struct Worker {
    queue: Arc<Queue>,
    epoll: Arc<Epoll>,
    wake: Arc<EventFd>,
    exit: Arc<AtomicBool>,
    /// Held while the worker serves the queue: stopping a queue waits for its batch.
    busy: Arc<std::sync::Mutex<()>>,
    /// The kick eventfd registered with the epoll, if any.
    registered: Option<i32>,
    thread: Option<JoinHandle<()>>,
}

/// A guest memory mapping, to translate the frontend's addresses of the rings.
struct Mapping {
    vmm_addr: u64,
    size: u64,
    gpa_base: u64,
}

/// The vhost-user device of one disk for one frontend connection.
pub struct Handler {
    backend: Arc<BlkBackend>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    mappings: Vec<Mapping>,
    workers: Vec<Worker>,
    owned: bool,
    acked_features: u64,
    acked_protocol_features: u64,
    inflight: Option<Arc<Region>>,
}

impl Handler {
    /// Creates the queues and starts one worker thread for each.
    pub fn new(backend: Arc<BlkBackend>, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> Result<Self, Error> {
        let mut workers = Vec::new();
        for index in 0..backend.num_queues() {
            let vring = VringRwLock::new(mem.clone(), MAX_QUEUE_SIZE as u16).map_err(Error::Vring)?;
            let queue = Arc::new(Queue::new(index as u16, vring));
            let epoll = Arc::new(Epoll::new().map_err(Error::Event)?);
            let wake = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(Error::Event)?);
            epoll
                .ctl(ControlOperation::Add, wake.as_raw_fd(), EpollEvent::new(EventSet::IN, WAKE))
                .map_err(Error::Event)?;
            let exit = Arc::new(AtomicBool::new(false));
            let busy = Arc::new(std::sync::Mutex::new(()));
            let thread = {
                let (backend, queue, epoll, wake, exit, busy) =
                    (backend.clone(), queue.clone(), epoll.clone(), wake.clone(), exit.clone(), busy.clone());
                std::thread::Builder::new()
                    .name(format!("vring-{index}"))
                    .spawn(move || run_worker(&backend, &queue, &epoll, &wake, &exit, &busy))
                    .map_err(Error::Spawn)?
            };
            workers.push(Worker { queue, epoll, wake, exit, busy, registered: None, thread: Some(thread) });
        }
        Ok(Handler {
            backend,
            mem,
            mappings: Vec::new(),
            workers,
            owned: false,
            acked_features: 0,
            acked_protocol_features: 0,
            inflight: None,
        })
    }

    /// Ends the connection's work: held requests are released, every request taken completes,
    /// the workers stop. The inflight region, if any, then records nothing in flight.
    pub fn shutdown(&mut self) {
        for w in &self.workers {
            w.queue.release_held();
            w.exit.store(true, Ordering::Release);
            let _ = w.wake.write(1);
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                if t.join().is_err() {
                    error!(queue = w.queue.index, "a queue worker panicked");
                }
            }
            // After the worker: it may have handed out held requests until it stopped.
            w.queue.drain_held();
        }
    }

    fn worker(&self, index: u32) -> VuResult<&Worker> {
        self.workers.get(index as usize).ok_or(VuError::InvalidParam)
    }

    fn vring(&self, index: u32) -> VuResult<&VringRwLock> {
        Ok(&self.worker(index)?.queue.vring)
    }

    fn vmm_va_to_gpa(&self, va: u64) -> VuResult<u64> {
        self.mappings
            .iter()
            .find(|m| va >= m.vmm_addr && va - m.vmm_addr < m.size)
            .map(|m| va - m.vmm_addr + m.gpa_base)
            .ok_or(VuError::InvalidParam)
    }

    /// Starts the queue once it has its kick eventfd (the frontend's order: NUM, BASE, ADDR,
    /// KICK, CALL): with an inflight region, recovers it first and resumes the available ring
    /// where the previous backend stopped taking requests.
    fn start_if_ready(&mut self, index: u32) -> VuResult<()> {
        let w = self.worker(index)?;
        let (ready, has_kick) = {
            let state = w.queue.vring.get_ref();
            (state.get_queue().ready(), state.get_kick().is_some())
        };
        if ready || !has_kick {
            return Ok(());
        }
        if let Some(region) = self.inflight.clone().filter(|r| index < u32::from(r.num_queues())) {
            let next_avail = w.queue.start_inflight(region).map_err(refuse)?;
            w.queue.vring.set_queue_next_avail(next_avail);
        }
        w.queue.hold_again();
        w.queue.vring.set_queue_ready(true);
        // The previous backend may have completed requests after the frontend stopped
        // listening to it (a graceful stop finishes what it took): tell the driver to look at
        // the used ring, as libvhost-user does when it gets a call eventfd. A driver that
        // finds nothing new ignores it.
        if let Err(e) = w.queue.vring.signal_used_queue() {
            debug!(queue = index, error = %e, "cannot signal the call eventfd");
        }
        self.update_registration(index)?;
        // Requests to resubmit (or made available before the kick fd was registered) are
        // served without waiting for a kick that may never come.
        let _ = self.worker(index)?.wake.write(1);
        Ok(())
    }

    /// Watches the kick eventfd while the queue is started and enabled; stops watching it
    /// otherwise.
    fn update_registration(&mut self, index: u32) -> VuResult<()> {
        let w = self.workers.get_mut(index as usize).ok_or(VuError::InvalidParam)?;
        let (active, fd) = {
            let state = w.queue.vring.get_ref();
            (state.get_queue().ready() && state.is_enabled(), state.get_kick().as_ref().map(|k| k.as_raw_fd()))
        };
        let want = if active { fd } else { None };
        if w.registered == want {
            return Ok(());
        }
        if let Some(old) = w.registered.take() {
            let _ = w.epoll.ctl(ControlOperation::Delete, old, EpollEvent::new(EventSet::IN, KICK));
        }
        if let Some(fd) = want {
            w.epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, KICK))
                .map_err(VuError::ReqHandlerError)?;
            w.registered = Some(fd);
            let _ = w.wake.write(1);
        }
        Ok(())
    }

    /// Stops a queue: no more kicks, and the batch in progress and held requests complete.
    fn stop_queue(&mut self, index: u32) -> VuResult<()> {
        let w = self.worker(index)?;
        w.queue.vring.set_queue_ready(false);
        self.update_registration(index)?;
        let w = self.worker(index)?;
        w.queue.release_held();
        drop(w.busy.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        w.queue.drain_held();
        w.queue.stop_inflight();
        Ok(())
    }

    fn unsupported(what: &'static str) -> VuError {
        debug!(request = what, "refusing a vhost-user request livesnap-blk does not offer");
        VuError::InvalidOperation("not supported")
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A queue's worker: serves the queue on each kick and each wake-up until told to exit.
fn run_worker(
    backend: &BlkBackend,
    queue: &Arc<Queue>,
    epoll: &Epoll,
    wake: &EventFd,
    exit: &AtomicBool,
    busy: &std::sync::Mutex<()>,
) {
    let mut events = [EpollEvent::default(); 4];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error!(queue = queue.index, error = %e, "queue worker cannot wait for events");
                return;
            }
        };
        let mut serve = false;
        for ev in &events[..n] {
            match ev.data() {
                KICK => serve |= queue.vring.read_kick().unwrap_or(false),
                _ => {
                    let _ = wake.read();
                    serve = true;
                }
            }
        }
        if exit.load(Ordering::Acquire) {
            return;
        }
        if serve {
            let _busy = busy.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let active = {
                let state = queue.vring.get_ref();
                state.get_queue().ready() && state.is_enabled()
            };
            if active {
                if let Err(e) = backend.process_queue(queue) {
                    // A broken ring is the frontend's fault; the worker waits for the next kick.
                    debug!(queue = queue.index, error = %livesnap_proto::error::chain(&e), "queue processing failed");
                }
            }
        }
    }
}

impl VhostUserBackendReqHandlerMut for Handler {
    fn set_owner(&mut self) -> VuResult<()> {
        if self.owned {
            return Err(VuError::InvalidOperation("already claimed"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.owned = false;
        self.acked_features = 0;
        self.acked_protocol_features = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        Err(Self::unsupported("RESET_DEVICE"))
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.backend.features())
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !self.backend.features() != 0 {
            return Err(VuError::InvalidParam);
        }
        self.acked_features = features;
        // Without PROTOCOL_FEATURES the rings are enabled at once (vhost-user "Ring states").
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            for index in 0..self.workers.len() as u32 {
                self.vring(index)?.set_enabled(true);
                self.update_registration(index)?;
            }
        }
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for w in &self.workers {
            w.queue.vring.set_queue_event_idx(event_idx);
        }
        self.backend.acked_features(features);
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening.is_some() {
            return Err(Self::unsupported("postcopy"));
        }
        let mut regions = Vec::new();
        let mut mappings = Vec::new();
        for (region, file) in ctx.iter().zip(files) {
            let guest = GuestRegionMmap::new(region.mmap_region(file)?, GuestAddress(region.guest_phys_addr))
                .ok_or(VuError::InvalidParam)?;
            mappings.push(Mapping {
                vmm_addr: region.user_addr,
                size: region.memory_size,
                gpa_base: region.guest_phys_addr,
            });
            regions.push(guest);
        }
        let mem = GuestMemoryMmap::from_regions(regions).map_err(refuse)?;
        self.mem.lock().map_err(|_| VuError::BackendInternalError)?.replace(mem);
        self.mappings = mappings;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        if num == 0 || num as usize > MAX_QUEUE_SIZE {
            return Err(VuError::InvalidParam);
        }
        self.vring(index)?.set_queue_size(num as u16);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let (desc, avail, used) =
            (self.vmm_va_to_gpa(descriptor)?, self.vmm_va_to_gpa(available)?, self.vmm_va_to_gpa(used)?);
        let vring = self.vring(index)?;
        vring.set_queue_info(desc, avail, used).map_err(|_| VuError::InvalidParam)?;
        // The used index is the ring's own (as libvhost-user does here): after a guest driver
        // reset it is 0 again, whatever SET_VRING_BASE says about the available ring.
        let idx = vring.queue_used_idx().map_err(|_| VuError::InvalidParam)?;
        vring.set_queue_next_used(idx);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        self.vring(index)?.set_queue_next_avail(base as u16);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.stop_queue(index)?;
        let vring = self.vring(index)?;
        let next_avail = vring.queue_next_avail();
        vring.set_kick(None);
        vring.set_call(None);
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, file: Option<File>) -> VuResult<()> {
        let index = u32::from(index);
        // The old eventfd leaves the epoll before it is closed.
        if let Some(w) = self.workers.get_mut(index as usize) {
            if let Some(old) = w.registered.take() {
                let _ = w.epoll.ctl(ControlOperation::Delete, old, EpollEvent::new(EventSet::IN, KICK));
            }
        }
        self.vring(index)?.set_kick(file);
        self.start_if_ready(index)?;
        self.update_registration(index)
    }

    fn set_vring_call(&mut self, index: u8, file: Option<File>) -> VuResult<()> {
        let vring = self.vring(u32::from(index))?;
        let has_call = file.is_some();
        vring.set_call(file);
        // A call eventfd that comes after the queue started (frontends send it before or after
        // the kick one) may have missed completions: tell the driver now, as libvhost-user
        // does, or it may wait for them forever.
        if has_call && vring.get_ref().get_queue().ready() {
            if let Err(e) = vring.signal_used_queue() {
                debug!(queue = index, error = %e, "cannot signal the new call eventfd");
            }
        }
        self.start_if_ready(u32::from(index))
    }

    fn set_vring_err(&mut self, index: u8, file: Option<File>) -> VuResult<()> {
        self.vring(u32::from(index))?.set_err(file);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(self.backend.protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        self.acked_protocol_features = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(self.workers.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        if self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(VuError::InactiveFeature(VhostUserVirtioFeatures::PROTOCOL_FEATURES));
        }
        self.vring(index)?.set_enabled(enable);
        self.update_registration(index)
    }

    fn get_config(&mut self, offset: u32, size: u32, _flags: VhostUserConfigFlags) -> VuResult<Vec<u8>> {
        Ok(self.backend.get_config(offset, size))
    }

    fn set_config(&mut self, offset: u32, buf: &[u8], _flags: VhostUserConfigFlags) -> VuResult<()> {
        self.backend.set_config(offset, buf).map_err(VuError::ReqHandlerError)
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(Self::unsupported("GPU_SET_SOCKET"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(Self::unsupported("GET_SHARED_OBJECT"))
    }

    fn get_inflight_fd(&mut self, msg: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        let region = Region::create(msg.num_queues, msg.queue_size, self.workers.len()).map_err(refuse)?;
        let file = region.file().try_clone().map_err(VuError::ReqHandlerError)?;
        info!(queues = msg.num_queues, queue_size = msg.queue_size, bytes = region.size(), "inflight region created");
        let reply = VhostUserInflight {
            mmap_size: region.size(),
            mmap_offset: region.offset(),
            num_queues: msg.num_queues,
            queue_size: msg.queue_size,
        };
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, msg: &VhostUserInflight, file: File) -> VuResult<()> {
        if self.workers.iter().any(|w| w.queue.vring.get_ref().get_queue().ready()) {
            return Err(refuse(inflight::Error::WhileRunning));
        }
        let region =
            Region::open(file, msg.mmap_size, msg.mmap_offset, msg.num_queues, msg.queue_size, self.workers.len())
                .map_err(refuse)?;
        info!(queues = msg.num_queues, queue_size = msg.queue_size, "inflight region set");
        self.inflight = Some(Arc::new(region));
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Err(Self::unsupported("GET_MAX_MEM_SLOTS"))
    }

    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        Err(Self::unsupported("ADD_MEM_REG"))
    }

    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        Err(Self::unsupported("REM_MEM_REG"))
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(Self::unsupported("SET_DEVICE_STATE_FD"))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(Self::unsupported("CHECK_DEVICE_STATE"))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(Self::unsupported("GET_SHMEM_CONFIG"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        Err(Self::unsupported("SET_LOG_BASE"))
    }
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handler").field("queues", &self.workers.len()).field("inflight", &self.inflight).finish()
    }
}
