//! The allocator of plugins built with `sluice-plugin-sdk`: free lists of small
//! blocks, one per power-of-two size class, in front of a general allocator (talc on
//! wasm) that serves the large blocks and the chunks the small ones are cut from.
//!
//! Why a front at all: a plugin allocates a few dozen small blocks per call (the
//! request the gateway lowers into it, serde's strings, the decision it returns) and
//! frees all of them at the call's end. talc splits and coalesces on every one of
//! them, about 400 machine instructions per allocate-and-free pair, a fifth of the
//! four-plugin chain's guest work (bench/README.md); a free-list pop and push take
//! about 90. A freed small block goes back to its class's list and is never
//! returned to the general allocator, so an instance keeps its peak of small blocks;
//! the gateway bounds an instance's memory (and throws instances away after faults).
//!
//! It is the SDK's one place for `unsafe`, kept apart as `sluice-sockopt` is for the
//! gateway: `GlobalAlloc` is an unsafe trait and a free list writes through the
//! pointers it keeps. A fault here stays inside the plugin's sandbox: the gateway
//! sees a trap, never its own memory touched.
#![no_std]

use core::alloc::{GlobalAlloc, Layout};
use core::cell::Cell;
use core::ptr;

/// Size classes: 8, 16, …, 2048 bytes. Larger (or more aligned) blocks go to the
/// general allocator.
const CLASSES: usize = 9;
/// The smallest class, as a power of two (8 bytes: room for the free list's link).
const MIN_SHIFT: u32 = 3;
/// The largest block a class serves.
pub const MAX_SMALL: usize = 1 << (MIN_SHIFT as usize + CLASSES - 1);
/// Bytes asked of the general allocator when a class runs dry (at least 8 blocks).
const CHUNK: usize = 4096;

/// One size class: its free list, and the unused end of the chunk it cuts from.
struct Class {
    /// Address of the first free block (0: none); each free block holds the next's.
    free: Cell<usize>,
    /// Next uncut byte of the current chunk, and the chunk's end.
    cut: Cell<usize>,
    end: Cell<usize>,
}

impl Class {
    const fn empty() -> Class {
        Class {
            free: Cell::new(0),
            cut: Cell::new(0),
            end: Cell::new(0),
        }
    }
}

/// Small blocks from per-class free lists; large ones, and chunks, from `B`.
pub struct SizeClasses<B> {
    base: B,
    classes: [Class; CLASSES],
}

impl<B> SizeClasses<B> {
    /// Free lists in front of `base`, all empty.
    pub const fn new(base: B) -> Self {
        SizeClasses {
            base,
            classes: [const { Class::empty() }; CLASSES],
        }
    }
}

/// The class serving `layout`, if a class does: blocks of a class are cut at multiples
/// of its size from a chunk aligned to it, so each is aligned to its size.
fn class_of(layout: Layout) -> Option<usize> {
    let size = layout.size().max(layout.align());
    if size > MAX_SMALL {
        return None;
    }
    let bits = usize::BITS - size.saturating_sub(1).leading_zeros();
    Some(bits.saturating_sub(MIN_SHIFT) as usize)
}

/// The block size of class `class`.
fn block_size(class: usize) -> usize {
    1 << (class + MIN_SHIFT as usize)
}

impl<B: GlobalAlloc> SizeClasses<B> {
    /// A block of class `class`: popped from its free list, else cut from its chunk,
    /// else from a new chunk. Null when the general allocator has no more.
    #[allow(unsafe_code, reason = "reads the link a free block holds")]
    fn take(&self, class: usize) -> *mut u8 {
        let c = &self.classes[class];
        let head = c.free.get();
        if head != 0 {
            // SAFETY: `head` is a block of this class that `give` put on the list: at
            // least 8 bytes, aligned to 8, not in use, its first word the next link.
            c.free.set(unsafe { ptr::read(head as *const usize) });
            return head as *mut u8;
        }
        let size = block_size(class);
        if c.end.get() - c.cut.get() < size {
            let chunk = CHUNK.max(size * 8);
            let Ok(layout) = Layout::from_size_align(chunk, size) else {
                return ptr::null_mut();
            };
            // SAFETY: `layout` has a non-zero size.
            let fresh = unsafe { self.base.alloc(layout) };
            if fresh.is_null() {
                return ptr::null_mut();
            }
            c.cut.set(fresh as usize);
            c.end.set(fresh as usize + chunk);
        }
        let block = c.cut.get();
        c.cut.set(block + size);
        block as *mut u8
    }

    /// Puts `block`, of class `class`, on its free list.
    #[allow(unsafe_code, reason = "writes the link into the freed block")]
    fn give(&self, block: *mut u8, class: usize) {
        let c = &self.classes[class];
        // SAFETY: `block` came from `take(class)` and its owner has freed it: at least 8
        // bytes, aligned to 8, ours to write.
        unsafe { ptr::write(block as *mut usize, c.free.get()) };
        c.free.set(block as usize);
    }
}

// SAFETY: small blocks come from chunks `B` handed over and are given out at most once
// until freed; every block is at least as large as its layout's size and aligned to its
// layout's align (`class_of`); anything else is `B`'s, with the layout it was asked for.
#[allow(unsafe_code, reason = "GlobalAlloc is an unsafe trait")]
unsafe impl<B: GlobalAlloc> GlobalAlloc for SizeClasses<B> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match class_of(layout) {
            Some(class) => self.take(class),
            // SAFETY: the caller's `layout` contract is `B`'s.
            None => unsafe { self.base.alloc(layout) },
        }
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        match class_of(layout) {
            Some(class) => self.give(block, class),
            // SAFETY: a layout no class serves was allocated by `B` with this layout.
            None => unsafe { self.base.dealloc(block, layout) },
        }
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
            return ptr::null_mut();
        };
        match (class_of(layout), class_of(new_layout)) {
            // Still fits its block.
            (Some(old), Some(new)) if old == new => block,
            // SAFETY: both layouts are `B`'s, and the caller's contract is `B`'s.
            (None, None) => unsafe { self.base.realloc(block, layout, new_size) },
            _ => {
                // SAFETY: `new_layout` has a non-zero size (the caller's contract).
                let moved = unsafe { self.alloc(new_layout) };
                if !moved.is_null() {
                    // SAFETY: both blocks are valid for the smaller size and distinct
                    // (`block` is still in use); then `block` is freed with its layout.
                    unsafe {
                        ptr::copy_nonoverlapping(block, moved, layout.size().min(new_size));
                        self.dealloc(block, layout);
                    }
                }
                moved
            }
        }
    }
}

/// The allocator the SDK installs on wasm: size classes in front of talc.
#[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
pub type Wasm = SizeClasses<talc::wasm::WasmDynamicTalc>;

/// A [`Wasm`] allocator, for `#[global_allocator]`.
#[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
pub const fn wasm() -> Wasm {
    SizeClasses::new(talc::wasm::new_wasm_dynamic_allocator())
}

// SAFETY: wasm without the atomics feature has one thread, so the `Cell`s are never
// touched from two at once.
#[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
#[allow(unsafe_code, reason = "a global allocator must be Sync")]
unsafe impl Sync for Wasm {}

#[cfg(test)]
mod tests;
