// Package proof holds Treaty's end-to-end proof of issue 4: money transfers between two banks,
// each a real gRPC participant on its own PostgreSQL database, run as TCC, saga, 2PC and
// transactional message through real coordinators while a seeded fault injector delays, drops,
// duplicates and loses participant calls and coordinators crash and restart. The tests then
// check that no money was created or destroyed, that no balance went negative, that every
// transfer either moved its amount exactly once or not at all, that nothing is left reserved
// or prepared, and that every transaction ended without an operator.
//
// The package has no API: everything lives in its tests. The faults and the workload are drawn
// from a fixed seed; set TREATY_PROOF_SEED to another number (every run logs its seed) or to
// "random" to explore, and TREATY_TEST_LOG=1 to see the coordinators' logs.
package proof
