# Included into llama-cpp-python's CMake project by `make llama-cpp-wheel` (-DCMAKE_PROJECT_INCLUDE).
# Its CMakeLists forces LLAMA_BUILD_COMMON on, as a cache variable, though the Python bindings never
# load llama.cpp's common library (with cpp-httplib, about a third of the build). A normal variable
# wins over a cache variable (policy CMP0126, NEW in the CMake 3.21 the project requires): this one
# leaves the library out.
set(LLAMA_BUILD_COMMON OFF)
