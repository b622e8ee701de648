//go:build !unix

package storage

import "errors"

// diskFree is not implemented here: the MinFreeDisk guard is off.
func diskFree(string) (int64, error) { return 0, errors.ErrUnsupported }
