//! The bounded byte ring behind a console's memory buffer: the socket is read straight into its
//! free space (no copy between the read and the buffer), and the oldest bytes are evicted once
//! more than `capacity` are live.

use std::io::IoSliceMut;

/// A circular buffer holding at most `capacity` live bytes, with `slack` bytes of extra room
/// so that a read of up to `slack` bytes always fits before anything is evicted.
pub(crate) struct Ring {
    buf: Box<[u8]>,
    /// Index in `buf` of the oldest live byte.
    head: usize,
    /// Live bytes.
    len: usize,
    capacity: usize,
    slack: usize,
}

impl Ring {
    /// A ring of `capacity` live bytes plus `slack` bytes of read room (both at least 1).
    pub(crate) fn new(capacity: usize, slack: usize) -> Ring {
        Ring {
            // calloc'ed: pages the console never fills are never touched.
            buf: vec![0; capacity + slack].into_boxed_slice(),
            head: 0,
            len: 0,
            capacity,
            slack,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Up to `slack` bytes of free space after the live bytes, as one or two slices (two when
    /// it wraps around the end of the storage).
    pub(crate) fn spare(&mut self) -> [IoSliceMut<'_>; 2] {
        let size = self.buf.len();
        let tail = (self.head + self.len) % size;
        let room = (size - self.len).min(self.slack);
        let first = room.min(size - tail);
        let (before, after) = self.buf.split_at_mut(tail);
        [
            IoSliceMut::new(&mut after[..first]),
            IoSliceMut::new(&mut before[..room - first]),
        ]
    }

    /// The `n` bytes just written at the start of [`spare`](Ring::spare), as one or two slices.
    pub(crate) fn fresh(&self, n: usize) -> (&[u8], &[u8]) {
        let size = self.buf.len();
        let tail = (self.head + self.len) % size;
        let first = n.min(size - tail);
        (&self.buf[tail..tail + first], &self.buf[..n - first])
    }

    /// Makes `n` bytes written into [`spare`](Ring::spare) live, evicting the oldest bytes
    /// beyond `capacity`; returns how many were evicted.
    pub(crate) fn commit(&mut self, n: usize) -> usize {
        debug_assert!(n <= self.slack);
        self.len += n;
        let evicted = self.len.saturating_sub(self.capacity);
        self.head = (self.head + evicted) % self.buf.len();
        self.len -= evicted;
        evicted
    }

    /// Live bytes `from..to` (indices from the oldest live byte) as one or two slices.
    pub(crate) fn range(&self, from: usize, to: usize) -> (&[u8], &[u8]) {
        debug_assert!(from <= to && to <= self.len);
        let size = self.buf.len();
        let start = (self.head + from) % size;
        let n = to - from;
        let first = n.min(size - start);
        (&self.buf[start..start + first], &self.buf[..n - first])
    }

    /// Appends `data` (copying), evicting as needed; returns how many bytes were evicted.
    /// The drain reads into [`spare`](Ring::spare) instead; this serves tests.
    #[cfg(test)]
    pub(crate) fn push(&mut self, mut data: &[u8]) -> usize {
        let mut evicted = 0;
        while !data.is_empty() {
            let [mut a, mut b] = self.spare();
            let n = data.len().min(a.len() + b.len());
            let first = n.min(a.len());
            a[..first].copy_from_slice(&data[..first]);
            b[..n - first].copy_from_slice(&data[first..n]);
            evicted += self.commit(n);
            data = &data[n..];
        }
        evicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(ring: &Ring) -> Vec<u8> {
        let (a, b) = ring.range(0, ring.len());
        [a, b].concat()
    }

    #[test]
    fn keeps_the_newest_capacity_bytes_across_wraps() {
        let mut ring = Ring::new(5, 3);
        assert_eq!(ring.push(b"abc"), 0);
        assert_eq!(ring.push(b"def"), 1);
        assert_eq!(live(&ring), b"bcdef");
        assert_eq!(ring.push(b"ghijklm"), 7);
        assert_eq!(live(&ring), b"ijklm");
        for (i, chunk) in [&b"no"[..], b"pqr", b"s", b"tuvwx", b"yz"]
            .iter()
            .enumerate()
        {
            ring.push(chunk);
            assert!(ring.len() <= 5, "step {i}");
        }
        assert_eq!(live(&ring), b"vwxyz");
        let (a, b) = ring.range(1, 4);
        assert_eq!([a, b].concat(), b"wxy");
    }

    #[test]
    fn spare_is_bounded_by_slack_and_wraps() {
        let mut ring = Ring::new(4, 3);
        // Storage is 7 bytes; after 6 pushed and 2 evicted, head = 2, len = 4, tail = 6.
        ring.push(b"abcdef");
        let [a, b] = ring.spare();
        assert_eq!((a.len(), b.len()), (1, 2));
        let (x, y) = ring.fresh(3);
        assert_eq!((x.len(), y.len()), (1, 2));
    }
}
