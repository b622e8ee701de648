package main

import (
	"context"
	"errors"
)

func attackBigBundle(ctx context.Context, o attackOpts) (*attackResult, error) { return nil, errors.New("todo") }
func attackFetchAll(ctx context.Context, o attackOpts) (*attackResult, error)  { return nil, errors.New("todo") }
func attackRollback(ctx context.Context, o attackOpts) (*attackResult, error)  { return nil, errors.New("todo") }
