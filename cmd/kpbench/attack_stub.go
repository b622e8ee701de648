package main

import (
	"context"
	"errors"
)

func attackRollback(ctx context.Context, o attackOpts) (*attackResult, error)  { return nil, errors.New("todo") }
