package main

import (
	"context"
	"fmt"
	"io"

	"github.com/tessera-grid/tessera/services/router"
)

func keyCmd(ctx context.Context, args []string, stdout, _ io.Writer) error {
	if len(args) != 2 || args[0] != "add" {
		return fmt.Errorf("key: want `key add CUSTOMER`")
	}
	c, err := connectGrid(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	k := router.NewKey()
	if err := router.AddKey(ctx, c, k, args[1], "cli", nil); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "API key for customer %s: %s\n", args[1], k)
	return nil
}
