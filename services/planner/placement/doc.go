// Package placement decides which node holds which contiguous range of a
// model's layers so that the grid's token throughput is as high as possible,
// and re-plans with little weight movement when nodes come and go.
//
// The pieces, in the order data flows through them:
//
//   - Problem: the model and the live nodes (memory, throughput model,
//     region, state) and the network between them. It is plain data; build
//     it by hand in tests or convert live node records into it.
//   - Fleet: a Problem compiled for planning. Filters decide, each with one
//     reason, which nodes may hold layers and how many; Scorers bound the
//     token rate of a node holding k layers. Every rejection is recorded.
//   - Evaluate: the max-flow throughput of a placement (the objective the
//     Helix MILP maximises), strict or with partial inference.
//   - Strategy: a named way to place layers ("tessera", "petals", "exo").
//   - Placement: per node a layer range [First, End), the max flow, and the
//     per-stage replica sets the router uses; MovedBytes compares two.
package placement
