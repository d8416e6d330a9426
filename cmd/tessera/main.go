// Command tessera is Tessera's command-line tool: it runs the whole grid in
// one process (`tessera run`), imports and lists models, plans clusters, and
// streams completions.
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/tessera-grid/tessera/services/planner/plancli"
)

const usage = `tessera: run large models on a grid of GPUs

Usage:
  tessera run [--demo]                 the whole grid in one process (embedded NATS,
                                       all services, executors, settlement into ClickHouse)
  tessera model import PATH [flags]    import a llama2.c checkpoint as fragments
  tessera model ls                     list models
  tessera model synth [flags]          write a synthetic model with seeded random weights
  tessera plan --cluster FILE --model M [--strategy S]
                                       plan a published cluster file
  tessera complete -m MODEL "prompt"   stream a completion to the terminal
  tessera key add CUSTOMER             create an API key for a customer

Configuration is read from the environment; see README.md.
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := dispatch(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "tessera:", err)
		os.Exit(1)
	}
}

func dispatch(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return fmt.Errorf("no command given")
	}
	switch args[0] {
	case "run":
		return runGrid(ctx, args[1:], stdout, stderr)
	case "model":
		return modelCmd(ctx, args[1:], stdout, stderr)
	case "plan":
		return plancli.PlanCommand(ctx, args[1:], stdout, stderr)
	case "complete":
		return completeCmd(ctx, args[1:], stdout, stderr)
	case "key":
		return keyCmd(ctx, args[1:], stdout, stderr)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	fmt.Fprint(stderr, usage)
	return fmt.Errorf("unknown command %q", args[0])
}
