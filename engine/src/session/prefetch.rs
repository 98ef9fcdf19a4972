//! Cache prefetch hints for batched lookups: the session engine's only unsafe code.
//!
//! `_mm_prefetch` is a safe function with `#[target_feature(enable = "sse")]`, and calling
//! such a function needs `unsafe` even where the feature is part of the target's baseline, as
//! SSE is on every x86_64 target. On other architectures the hints compile to nothing.
#![allow(unsafe_code)]

/// Hints the CPU to load the cache lines of `len` bytes from `ptr` (at most 4 lines) into all
/// cache levels. Never faults, whatever the address; a hint only.
#[inline(always)]
pub(crate) fn prefetch_bytes(ptr: *const u8, len: usize) {
    #[cfg(all(target_arch = "x86_64", target_feature = "sse"))]
    {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let last = len.saturating_sub(1).min(255);
        let mut off = 0;
        while off <= last {
            // SAFETY: the cfg guarantees SSE, the feature `_mm_prefetch` requires; a
            // prefetch reads nothing the program can observe and never faults, whatever the
            // address (`wrapping_add` computes it without claiming it is in bounds).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(ptr.wrapping_add(off) as *const i8) };
            off += 64;
        }
        // The object's last line (it may start mid-line and straddle one line more).
        // SAFETY: as above.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(ptr.wrapping_add(last) as *const i8) };
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "sse")))]
    {
        let _ = (ptr, len);
    }
}

/// Hints the CPU to load the cache lines `value` occupies.
#[inline(always)]
pub(crate) fn prefetch<T>(value: &T) {
    prefetch_bytes(value as *const T as *const u8, core::mem::size_of::<T>());
}
