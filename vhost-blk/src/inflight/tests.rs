//! The inflight table against a model of a queue: requests taken in avail order, completed in
//! any order, the backend killed at every step of a take or a completion; the next backend must
//! resubmit exactly the requests taken and not in the used ring, oldest first, and resume the
//! available ring right after the requests taken.

use std::collections::BTreeSet;

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

use super::*;

const QUEUES: u16 = 2;
const SIZE: u16 = 16;

#[test]
fn queue_tables_are_sized_as_qemu_sizes_them() {
    // ALIGN_UP(16 * queue_size + 2, 64), as vu_inflight_queue_size computes it.
    assert_eq!(queue_region_size(128), 2112);
    assert_eq!(queue_region_size(256), 4160);
    assert_eq!(queue_region_size(3), 64);
    for qs in 1..=1024u16 {
        assert!(queue_region_size(qs) >= HEADER_LEN + DESC_LEN * usize::from(qs));
    }
    let r = Region::create(QUEUES, 128, 4).unwrap();
    assert_eq!(r.size(), 2 * 2112);
    assert_eq!(r.file().metadata().unwrap().len(), 2 * 2112);
}

/// The frontend's side: what it hands the next backend.
fn reopen(r: &Region) -> Arc<Region> {
    let file = r.file().try_clone().unwrap();
    Arc::new(Region::open(file, r.size(), r.offset(), r.num_queues(), r.queue_size(), 4).unwrap())
}

/// Where a backend is killed inside one step.
#[derive(Clone, Copy, Debug)]
enum Kill {
    /// Taking a batch: after marking this many of it.
    Take(usize),
    /// Completing a request: before anything, after pre_put, after the used ring, after the
    /// entry is cleared (post_put's first store).
    Complete(u8),
}

/// A queue driven the way the worker drives it, with a model of the rings.
struct Model {
    rng: fastrand::Rng,
    region: Arc<Region>,
    q: QueueInflight,
    /// Heads in the order the guest made them available.
    avail: Vec<u16>,
    /// Position in `avail` of the next request to take.
    next_avail: usize,
    /// The used ring's index.
    used: u16,
    /// Requests taken and not in the used ring, oldest first.
    outstanding: Vec<u16>,
    /// Heads free for the guest to make available.
    free: Vec<u16>,
    /// Avail position of each outstanding head.
    pos_of: [usize; SIZE as usize],
    /// The avail position of every request that went into the used ring, in order.
    done: Vec<usize>,
}

impl Model {
    fn new(seed: u64) -> Self {
        let region = Arc::new(Region::create(QUEUES, SIZE, 4).unwrap());
        let region = reopen(&region);
        let (q, resume) = QueueInflight::start(region.clone(), 1, SIZE, 0).unwrap();
        assert_eq!(resume, Resume { next_avail: 0, resubmit: vec![] });
        Model {
            rng: fastrand::Rng::with_seed(seed),
            region,
            q,
            avail: Vec::new(),
            next_avail: 0,
            used: 0,
            outstanding: Vec::new(),
            free: (0..SIZE).collect(),
            pos_of: [usize::MAX; SIZE as usize],
            done: Vec::new(),
        }
    }

    fn guest_adds(&mut self) {
        for _ in 0..self.rng.usize(0..=self.free.len()) {
            let i = self.rng.usize(..self.free.len());
            self.avail.push(self.free.swap_remove(i));
        }
    }

    /// Takes up to the whole available ring; false if killed.
    fn take(&mut self, kill: Option<usize>) -> bool {
        let batch: Vec<u16> = self.avail[self.next_avail..].to_vec();
        for (n, head) in batch.into_iter().enumerate() {
            if kill == Some(n) {
                return false;
            }
            self.q.take(head);
            self.pos_of[usize::from(head)] = self.next_avail;
            self.next_avail += 1;
            self.outstanding.push(head);
        }
        true
    }

    /// Completes one outstanding request, any of them; false if killed.
    fn complete(&mut self, kill: Option<u8>) -> bool {
        if self.outstanding.is_empty() {
            return kill.is_none();
        }
        let head = self.outstanding.remove(self.rng.usize(..self.outstanding.len()));
        let region = self.region.clone();
        let put_back = |m: &mut Self| {
            m.outstanding.push(head);
            m.outstanding.sort_by_key(|&h| region.table(1).counter(h));
        };
        if kill == Some(0) {
            put_back(self);
            return false;
        }
        self.q.pre_put(head);
        if kill == Some(1) {
            put_back(self);
            return false;
        }
        self.used = self.used.wrapping_add(1);
        self.done.push(self.pos_of[usize::from(head)]);
        self.free.push(head);
        if kill == Some(2) {
            return false;
        }
        region.table(1).set_inflight(head, false);
        if kill == Some(3) {
            return false;
        }
        self.q.post_put(head, self.used);
        true
    }

    /// A new backend on the same region: checks what it resumes from.
    fn restart(&mut self) {
        let region = reopen(&self.region);
        let (q, resume) = QueueInflight::start(region.clone(), 1, SIZE, self.used).unwrap();
        assert_eq!(
            resume.resubmit, self.outstanding,
            "resubmitted: the requests taken and not completed, oldest first"
        );
        assert_eq!(
            resume.next_avail, self.next_avail as u16,
            "resumes the available ring right after the requests taken"
        );
        self.region = region;
        self.q = q;
        while self.q.next_resubmit().is_some() {}
    }
}

#[test]
fn a_backend_killed_at_any_step_leaves_exactly_its_unfinished_requests_to_the_next() {
    for seed in 0..3000u64 {
        let mut m = Model::new(seed);
        for _ in 0..m.rng.usize(1..6) {
            for _ in 0..m.rng.usize(1..20) {
                m.guest_adds();
                let kill = match m.rng.u8(..8) {
                    0 => Some(Kill::Take(m.rng.usize(..usize::from(SIZE)))),
                    1 => Some(Kill::Complete(m.rng.u8(..4))),
                    _ => None,
                };
                let alive = match m.rng.bool() {
                    true => m.take(kill.and_then(|k| if let Kill::Take(n) = k { Some(n) } else { None })),
                    false => m.complete(kill.and_then(|k| if let Kill::Complete(n) = k { Some(n) } else { None })),
                };
                if !alive {
                    break;
                }
            }
            m.restart();
        }
        let once: BTreeSet<usize> = m.done.iter().copied().collect();
        assert_eq!(once.len(), m.done.len(), "seed {seed}: a request completed twice");
        assert!(once.iter().all(|&p| p < m.next_avail), "seed {seed}: a request completed before it was taken");
    }
}

#[test]
fn a_clean_restart_resumes_where_the_frontend_says_with_nothing_to_resubmit() {
    let mut m = Model::new(7);
    m.guest_adds();
    m.take(None);
    while !m.outstanding.is_empty() {
        m.complete(None);
    }
    m.restart();
    assert_eq!(usize::from(m.used), m.next_avail);
}

#[test]
fn tables_that_do_not_check_out_are_refused() {
    let fresh = || {
        let r = Region::create(QUEUES, SIZE, 4).unwrap();
        let r = reopen(&r);
        let (_, _) = QueueInflight::start(r.clone(), 0, SIZE, 0).unwrap();
        r
    };
    let r = fresh();
    r.table(0).store16(VERSION_AT, 2);
    assert!(matches!(QueueInflight::start(r, 0, SIZE, 0), Err(Error::Version { version: 2, .. })));

    let r = fresh();
    r.table(0).store16(DESC_NUM_AT, SIZE + 1);
    assert!(matches!(QueueInflight::start(r, 0, SIZE, 0), Err(Error::DescNum { .. })));

    let r = fresh();
    r.table(0).store16(LAST_BATCH_HEAD_AT, 999);
    assert!(matches!(QueueInflight::start(r, 0, SIZE, 5), Err(Error::Head { head: 999, .. })));

    // A head in the table past the queue the frontend set up now.
    let r = fresh();
    r.table(0).set_inflight(SIZE - 1, true);
    assert!(matches!(QueueInflight::start(r.clone(), 0, SIZE / 2, 0), Err(Error::Head { .. })));
    assert!(matches!(QueueInflight::start(r, 0, SIZE * 2, 0), Err(Error::QueueTooLarge { .. })));
}

#[test]
fn regions_that_do_not_fit_are_refused() {
    let r = Region::create(QUEUES, SIZE, 4).unwrap();
    let file = || r.file().try_clone().unwrap();
    assert!(matches!(Region::open(file(), r.size() - 1, 0, QUEUES, SIZE, 4), Err(Error::Size { .. })));
    assert!(matches!(Region::open(file(), r.size(), 64, QUEUES, SIZE, 4), Err(Error::Size { .. })));
    assert!(matches!(Region::open(file(), r.size() + 4096, 0, QUEUES, SIZE, 4), Err(Error::FileTooSmall { .. })));
    assert!(matches!(Region::open(file(), r.size(), 0, 5, SIZE, 4), Err(Error::Geometry { .. })));
    assert!(matches!(Region::open(file(), r.size(), 0, QUEUES, 0, 4), Err(Error::Geometry { .. })));
    assert!(matches!(Region::create(0, SIZE, 4), Err(Error::Geometry { .. })));
    // The region created is sealed: nobody can shrink it under a mapping.
    assert!(r.file().set_len(1).is_err());
    // A plain file cannot be sealed: refused rather than mapped at the mercy of a truncate.
    let plain = tempfile::tempfile().unwrap();
    plain.set_len(r.size()).unwrap();
    assert!(matches!(Region::open(plain, r.size(), 0, QUEUES, SIZE, 4), Err(Error::Seal(_))));
}

fn write_desc(mem: &GuestMemoryMmap, table: u64, i: u16, addr: u64, len: u32, flags: u32, next: u16) {
    let d = Descriptor::new(addr, len, flags as u16, next);
    mem.write_obj(d, GuestAddress(table + 16 * u64::from(i))).unwrap();
}

#[test]
fn chains_are_found_again_by_head_direct_and_indirect() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let table = 0x1000;
    // Head 3: 3 -> 5 -> 1, the last writable.
    write_desc(&mem, table, 3, 0x4000, 16, VRING_DESC_F_NEXT, 5);
    write_desc(&mem, table, 5, 0x5000, 512, VRING_DESC_F_NEXT, 1);
    write_desc(&mem, table, 1, 0x6000, 1, VRING_DESC_F_WRITE, 0);
    let got: Vec<_> = chain_at(&mem, GuestAddress(table), 8, 3).map(|d| (d.addr().0, d.len())).collect();
    assert_eq!(got, [(0x4000, 16), (0x5000, 512), (0x6000, 1)]);

    // Head 0: an indirect table of two.
    let ind = 0x2000;
    write_desc(&mem, table, 0, ind, 32, VRING_DESC_F_INDIRECT, 0);
    write_desc(&mem, ind, 0, 0x7000, 16, VRING_DESC_F_NEXT, 1);
    write_desc(&mem, ind, 1, 0x7100, 1, VRING_DESC_F_WRITE, 0);
    let got: Vec<_> = chain_at(&mem, GuestAddress(table), 8, 0).map(|d| d.addr().0).collect();
    assert_eq!(got, [0x7000, 0x7100]);

    // Hostile: a loop ends after the queue's size; a head past the table yields nothing;
    // an indirect table inside an indirect table ends the chain.
    write_desc(&mem, table, 6, 0x4000, 16, VRING_DESC_F_NEXT, 7);
    write_desc(&mem, table, 7, 0x4000, 16, VRING_DESC_F_NEXT, 6);
    assert_eq!(chain_at(&mem, GuestAddress(table), 8, 6).count(), 8);
    assert_eq!(chain_at(&mem, GuestAddress(table), 8, 8).count(), 0);
    write_desc(&mem, ind, 0, 0x2000, 32, VRING_DESC_F_INDIRECT, 0);
    assert_eq!(chain_at(&mem, GuestAddress(table), 8, 0).count(), 0);
    // A table outside guest memory.
    assert_eq!(chain_at(&mem, GuestAddress(0xffff_0000), 8, 0).count(), 0);
}
