package main

import (
	"context"
	"errors"
	"io"
	"time"
)

func restartScenario(ctx context.Context, out io.Writer, o options, idle time.Duration, capacity float64, progress bool) error {
	return errors.New("-scenario restart: not implemented yet")
}
