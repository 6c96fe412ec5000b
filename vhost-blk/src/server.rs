//! One listener per disk: each frontend connection gets a fresh vhost-user device, so a VM
//! that shuts down or a QEMU that is killed leaves the disk ready for the next connection.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use thiserror::Error;
use tracing::{error, info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::BlkBackend;
use crate::virtio::BlkDevice;

#[derive(Debug, Error)]
pub enum Error {
    #[error("Cannot listen on {}", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: vhost::vhost_user::Error,
    },
}

/// Connection state shared between a disk's server thread and whoever stops it.
#[derive(Default)]
struct Slot {
    stopping: bool,
    /// A frontend is connected and its worker threads may be running.
    busy: bool,
    active: Option<ShutdownHandle>,
}

/// Stops a [`DiskServer`] from another thread.
#[derive(Clone)]
pub struct Stopper(Arc<(Mutex<Slot>, Condvar)>);

impl std::fmt::Debug for Stopper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stopper")
    }
}

impl Stopper {
    /// Refuses new connections, disconnects the current one and waits until its in-flight
    /// requests have completed and the disk has been flushed.
    pub fn stop(&self) {
        let (lock, cv) = &*self.0;
        let mut slot = lock.lock().unwrap_or_else(PoisonError::into_inner);
        slot.stopping = true;
        if let Some(h) = &slot.active {
            h.shutdown();
        }
        while slot.busy {
            slot = cv.wait(slot).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Serves one disk on its vhost-user socket, one frontend at a time.
pub struct DiskServer {
    name: String,
    dev: Arc<BlkDevice>,
    listener: Listener,
    socket: PathBuf,
    num_queues: usize,
    stopper: Stopper,
}

impl std::fmt::Debug for DiskServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskServer").field("name", &self.name).field("socket", &self.socket).finish()
    }
}

impl DiskServer {
    /// Binds the socket now, so that a bad path fails at start-up rather than in a thread.
    pub fn bind(name: String, dev: Arc<BlkDevice>, socket: &Path, num_queues: usize) -> Result<Self, Error> {
        let listener =
            Listener::new(socket, true).map_err(|source| Error::Listen { path: socket.to_owned(), source })?;
        Ok(DiskServer { name, dev, listener, socket: socket.to_owned(), num_queues, stopper: Stopper(Arc::default()) })
    }

    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Accepts and serves frontends until stopped.
    pub fn run(mut self) {
        loop {
            if let Err(e) = self.serve_one() {
                // Accept failures (out of descriptors, say) are retried, not fatal.
                error!(disk = %self.name, error = %e, "vhost-user connection failed");
                std::thread::sleep(Duration::from_millis(100));
            }
            if self.slot().stopping {
                return;
            }
        }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.stopper.0 .0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn serve_one(&mut self) -> Result<(), vhost_user_backend::Error> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(BlkBackend::new(self.dev.clone(), mem.clone(), self.num_queues));
        let mut daemon = VhostUserDaemon::new(format!("vhost-blk-{}", self.name), backend, mem)?;
        daemon.start(&mut self.listener)?;
        {
            let mut slot = self.slot();
            let handle = daemon.shutdown_handle();
            if slot.stopping {
                if let Some(h) = &handle {
                    h.shutdown();
                }
            }
            slot.busy = true;
            slot.active = handle;
        }
        info!(disk = %self.name, "frontend connected");
        let result = daemon.wait();
        // Dropping the daemon joins the queue threads: every request they took has completed.
        drop(daemon);
        if let Err(e) = self.dev.disk.flush() {
            warn!(disk = %self.name, error = %livesnap_proto::error::chain(&e), "flush after disconnect failed");
        }
        info!(disk = %self.name, "frontend disconnected");
        let mut slot = self.slot();
        slot.busy = false;
        slot.active = None;
        self.stopper.0 .1.notify_all();
        match result {
            // A VM that shuts down or a QEMU that is killed just goes away.
            Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => Ok(()),
            r => r,
        }
    }
}
