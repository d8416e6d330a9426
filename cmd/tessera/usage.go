package main

import (
	"context"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/tessera-grid/tessera/services/settlement"
)

// printUsage waits until settlement has stored want usage rows for the
// request, then prints them as read back from ClickHouse.
func printUsage(ctx context.Context, w io.Writer, cfg settlement.Config, request string, want int) error {
	var rows []settlement.UsageRow
	for {
		var err error
		rows, err = settlement.RequestUsage(ctx, cfg, request)
		if err == nil && len(rows) >= want {
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for %d usage rows of %s in ClickHouse (have %d, last error %v): %w", want, request, len(rows), err, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
	fmt.Fprintf(w, "Usage rows in ClickHouse for request %s:\n", request)
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "seq\tnode\tfragment\tprompt\tgenerated\tlayer_tokens\tcompute_us\tcharge_micros\tearning_micros")
	for _, r := range rows {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%d\t%d\t%d\t%d\t%d\t%d\n", r.Seq, r.Node, r.Fragment, r.PromptTokens, r.GeneratedTokens, r.LayerTokens, r.ComputeUS, r.ChargeMicros, r.EarningMicros)
	}
	return tw.Flush()
}
