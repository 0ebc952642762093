//! The allocator over the system's, natively: every block aligned, disjoint from the
//! others, keeping its bytes, and small blocks reused after they are freed.
#![allow(unsafe_code, reason = "drives a GlobalAlloc")]

extern crate std;

use core::alloc::{GlobalAlloc, Layout};
use std::alloc::System;
use std::vec::Vec;

use super::*;

/// A live block: where, its layout, and the byte it is filled with.
struct Live {
    at: *mut u8,
    layout: Layout,
    fill: u8,
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn fill(block: &Live) {
    // SAFETY: `at` is a live block of `layout.size()` bytes.
    unsafe { core::ptr::write_bytes(block.at, block.fill, block.layout.size()) }
}

fn intact(block: &Live, size: usize) -> bool {
    // SAFETY: `at` is a live block of at least `size` bytes.
    let bytes = unsafe { core::slice::from_raw_parts(block.at, size) };
    bytes.iter().all(|&b| b == block.fill)
}

#[test]
fn classes_cover_sizes_and_alignments() {
    let class = |size, align| class_of(Layout::from_size_align(size, align).unwrap());
    assert_eq!(class(1, 1), Some(0));
    assert_eq!(class(8, 8), Some(0));
    assert_eq!(class(9, 1), Some(1));
    assert_eq!(class(1, 16), Some(1));
    assert_eq!(class(2048, 1), Some(CLASSES - 1));
    assert_eq!(class(2049, 1), None);
    assert_eq!(class(8, 4096), None);
    assert_eq!(class(0, 1), Some(0));
    for c in 0..CLASSES {
        assert_eq!(class(block_size(c), 1), Some(c));
        assert!(block_size(c) >= 8);
    }
}

#[test]
fn random_traffic_keeps_blocks_apart_aligned_and_whole() {
    let heap = SizeClasses::new(System);
    let mut rng = Rng(0x5eed_0f51_u64);
    let mut live: Vec<Live> = Vec::new();
    for step in 0..20_000u32 {
        match rng.below(10) {
            // Allocate: mostly small, sometimes past the classes, with odd alignments.
            0..=4 => {
                let size = match rng.below(8) {
                    0 => 1 + rng.below(5000) as usize,
                    _ => 1 + rng.below(300) as usize,
                };
                let align = 1 << rng.below(7);
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: non-zero size.
                let at = unsafe { heap.alloc(layout) };
                assert!(!at.is_null());
                assert_eq!(at as usize % align, 0, "step {step}: {layout:?} at {at:p}");
                let block = Live {
                    at,
                    layout,
                    fill: step as u8,
                };
                fill(&block);
                live.push(block);
            }
            // Grow or shrink one, across classes and past them.
            5..=6 if !live.is_empty() => {
                let i = rng.below(live.len() as u64) as usize;
                let new_size = 1 + rng.below(3000) as usize;
                let block = &mut live[i];
                let kept = block.layout.size().min(new_size);
                // SAFETY: a live block with its layout; non-zero new size.
                let at = unsafe { heap.realloc(block.at, block.layout, new_size) };
                assert!(!at.is_null());
                block.at = at;
                block.layout = Layout::from_size_align(new_size, block.layout.align()).unwrap();
                assert!(intact(block, kept), "step {step}: realloc lost bytes");
                assert_eq!(at as usize % block.layout.align(), 0);
                fill(block);
            }
            // Free one, checking it was not written by anyone else.
            _ if !live.is_empty() => {
                let i = rng.below(live.len() as u64) as usize;
                let block = live.swap_remove(i);
                assert!(
                    intact(&block, block.layout.size()),
                    "step {step}: overwritten"
                );
                // SAFETY: a live block with its layout.
                unsafe { heap.dealloc(block.at, block.layout) };
            }
            _ => {}
        }
    }
    for block in &live {
        assert!(intact(block, block.layout.size()));
    }
    // No two live blocks overlap.
    let mut spans: Vec<(usize, usize)> = live
        .iter()
        .map(|b| (b.at as usize, b.at as usize + b.layout.size()))
        .collect();
    spans.sort_unstable();
    assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0));
    // The system's blocks are not returned: small ones stay on their lists, by design.
    for block in live {
        // SAFETY: live blocks with their layouts.
        unsafe { heap.dealloc(block.at, block.layout) };
    }
}

#[test]
fn a_freed_small_block_is_the_next_one_given() {
    let heap = SizeClasses::new(System);
    let layout = Layout::from_size_align(24, 8).unwrap();
    // SAFETY: non-zero sizes; each block freed once with its layout.
    unsafe {
        let a = heap.alloc(layout);
        let b = heap.alloc(layout);
        assert_eq!(b as usize - a as usize, 32, "cut one after the other");
        heap.dealloc(a, layout);
        assert_eq!(heap.alloc(layout), a);
        // A realloc within the class keeps the block.
        assert_eq!(heap.realloc(b, layout, 30), b);
        heap.dealloc(a, layout);
        heap.dealloc(b, Layout::from_size_align(30, 8).unwrap());
    }
}

/// A base that has nothing to give: the allocator answers null, as Rust expects of an
/// allocator out of memory (the plugin then traps at its memory cap).
struct Empty;

// SAFETY: never hands out memory.
unsafe impl GlobalAlloc for Empty {
    unsafe fn alloc(&self, _: Layout) -> *mut u8 {
        core::ptr::null_mut()
    }

    unsafe fn dealloc(&self, _: *mut u8, _: Layout) {}
}

#[test]
fn out_of_memory_is_null() {
    let heap = SizeClasses::new(Empty);
    for size in [1, 100, 5000] {
        let layout = Layout::from_size_align(size, 1).unwrap();
        // SAFETY: non-zero size.
        assert!(unsafe { heap.alloc(layout) }.is_null());
    }
}
