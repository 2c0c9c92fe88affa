// What keeps one library's state one per process. The slot table, the kernel registry, the
// capture stores, the placeholder stores and the dispatch marker are statics of inline functions
// and classes: with default symbol visibility a process holds one of each, however many shared
// libraries include the headers; a library built with -fvisibility=hidden would hold its own, and
// a chain fused in one would not find a Slot, kernel or capture of another. FUSION_API keeps them
// visible whatever the build's default (tests/two-libraries proves it with hidden visibility).
// The inline namespace gives them a versioned name: two versions of the library in one process
// keep separate state instead of reading each other's.
#pragma once

#if defined(__GNUC__) || defined(__clang__)
#define FUSION_API __attribute__((visibility("default")))
#else
#define FUSION_API
#endif

// Change when a class holding shared state changes its layout or meaning.
#define FUSION_ABI_VERSION abi_v2
