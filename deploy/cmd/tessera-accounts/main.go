// Command tessera-accounts makes the credentials and the server
// configuration of a secured Tessera grid (see deploy/README.md).
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/tessera-grid/tessera/deploy/accounts"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := accounts.Command(ctx, os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "tessera-accounts:", err)
		os.Exit(1)
	}
}
