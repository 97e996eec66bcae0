// The stb_image decoders, compiled with the fuzzing instrumentation. The executable's definitions
// take precedence over Debian's uninstrumented libstb, so the image-folder reader calls these.
#define STB_IMAGE_IMPLEMENTATION
#include <stb/stb_image.h>
