package policy

// SetReadFile replaces the file reader the compiler uses and returns a
// function that restores it, so tests can see which files were opened.
func SetReadFile(f func(string) ([]byte, error)) (restore func()) {
	old := readFile
	readFile = f
	return func() { readFile = old }
}
