"""The jobs (inspect, convert, imatrix, quantize, eval), composed from the library's parts."""
