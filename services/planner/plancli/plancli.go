// Package plancli implements `tessera plan`: plan a Helix cluster file with
// a placement strategy and print the result, the last line as JSON.
package plancli

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/tessera-grid/tessera/services/planner/helix"
	"github.com/tessera-grid/tessera/services/planner/placement"
)

// Result is the JSON object PlanCommand prints on its last line.
type Result struct {
	Cluster  string `json:"cluster"`
	Model    string `json:"model"`
	Strategy string `json:"strategy"`
	// MaxFlowTokensPerS is the plan's max flow with strict hand-offs (the
	// Helix MILP objective); PartialFlowTokensPerS allows partial inference.
	MaxFlowTokensPerS     float64 `json:"max_flow_tokens_per_s"`
	PartialFlowTokensPerS float64 `json:"partial_flow_tokens_per_s"`
	// PlanMS is the strategy's wall time in milliseconds.
	PlanMS float64 `json:"plan_ms"`
	// Placement maps each used node's index in the cluster file to its
	// layers [first, end).
	Placement  map[string][2]int     `json:"placement"`
	NodesUsed  int                   `json:"nodes_used"`
	Stages     int                   `json:"stages"`
	Rejections []placement.Rejection `json:"rejections,omitempty"`
}

// PlanCommand runs `tessera plan --cluster FILE.ini --model NAME
// [--strategy NAME]` with args (flags only, without "plan").
func PlanCommand(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("plan", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cluster := fs.String("cluster", "", "Helix cluster file (.ini with [ComputeNode-N] sections)")
	model := fs.String("model", "", "model: "+strings.Join(helix.Models(), " | "))
	strategy := fs.String("strategy", placement.TesseraName, "placement strategy: "+strings.Join(placement.StrategyNames(), " | "))
	evals := fs.Int("evaluations", 0, "local-search budget of the tessera strategy in max-flow evaluations (0: its default, negative: none)")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: tessera plan --cluster FILE.ini --model NAME [--strategy NAME]")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("%w: %w", ErrUsage, err)
	}
	if *cluster == "" || *model == "" || fs.NArg() > 0 {
		fs.Usage()
		return fmt.Errorf("%w: --cluster and --model are required, and nothing else", ErrUsage)
	}
	strat, err := placement.StrategyByName(*strategy)
	if err != nil {
		return err
	}
	if t, ok := strat.(placement.Tessera); ok {
		t.Evaluations = *evals
		strat = t
	}
	p, err := LoadProblem(*cluster, *model)
	if err != nil {
		return err
	}
	start := time.Now()
	pl, err := strat.Place(ctx, p, nil)
	if err != nil {
		return fmt.Errorf("plan %s with %s: %w", *cluster, strat.Name(), err)
	}
	elapsed := time.Since(start)
	partial, err := placement.Evaluate(p, pl.Assignments, placement.Partial)
	if err != nil {
		return err
	}
	res := Result{
		Cluster: *cluster, Model: *model, Strategy: strat.Name(),
		MaxFlowTokensPerS: pl.TokensPerS, PartialFlowTokensPerS: partial.TokensPerS,
		PlanMS: float64(elapsed.Microseconds()) / 1000, Placement: map[string][2]int{},
		NodesUsed: len(pl.Assignments), Stages: len(pl.Stages), Rejections: pl.Rejections,
	}
	fmt.Fprintf(stdout, "%s on %s (%d nodes), strategy %s, planned in %.1f ms\n",
		*model, *cluster, len(p.Nodes), strat.Name(), res.PlanMS)
	for _, a := range pl.Assignments {
		n := p.Nodes[nodeIndex(p, a.Node)]
		fmt.Fprintf(stdout, "  node %-4s %-5s %-9s layers [%2d, %2d)  %8.1f tok/s\n",
			a.Node, n.Device, n.Region, a.First, a.End, a.TokensPerS)
		res.Placement[a.Node] = [2]int{a.First, a.End}
	}
	for _, r := range pl.Rejections {
		fmt.Fprintf(stdout, "  node %-4s rejected by %s: %s\n", r.Node, r.Step, r.Reason)
	}
	fmt.Fprintf(stdout, "max flow %.2f tokens/s (strict hand-offs), %.2f with partial inference\n",
		res.MaxFlowTokensPerS, res.PartialFlowTokensPerS)
	line, err := json.Marshal(res)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(stdout, "%s\n", line)
	return err
}

// LoadProblem reads a Helix cluster file and builds the placement problem
// for one of the embedded models, with the cluster's own machine mix.
func LoadProblem(clusterFile, model string) (*placement.Problem, error) {
	m, err := helix.LoadModel(model)
	if err != nil {
		return nil, err
	}
	c, err := helix.LoadCluster(clusterFile)
	if err != nil {
		return nil, err
	}
	profiles, err := helix.MachineProfiles()
	if err != nil {
		return nil, err
	}
	return c.Problem(m, profiles, nil)
}

func nodeIndex(p *placement.Problem, id string) int {
	for i := range p.Nodes {
		if p.Nodes[i].ID == id {
			return i
		}
	}
	return -1
}
