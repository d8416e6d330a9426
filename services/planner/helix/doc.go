// Package helix reads the heterogeneous GPU fleets published with Helix
// (Mei et al., ASPLOS'25: cluster files, machine profiles, per-layer timing
// tables, stored placements), reproduces Helix's per-node typical-throughput
// model, and turns a cluster into a placement.Problem so that every strategy
// can be planned and scored on the same fleets as the paper.
//
// Units follow the Helix files: bandwidth in bytes/s ("mbps" is 10^6 bytes/s),
// memory in decimal bytes, latency in seconds, timing tables in milliseconds
// per layer. The machine profiles, timing tables and per-model constants are
// embedded (data/, Apache-2.0, see data/SOURCE.md).
package helix
