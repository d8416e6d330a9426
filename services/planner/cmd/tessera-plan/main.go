// Command tessera-plan is `tessera plan` on its own, for working on the
// planner without the full CLI.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"

	"github.com/tessera-grid/tessera/services/planner/plancli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := plancli.PlanCommand(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "tessera-plan:", err)
		if errors.Is(err, plancli.ErrUsage) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}
